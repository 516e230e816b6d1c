"""The guest's CPU and in-kernel platform state through KVM's ioctls, for snapshots.

What is saved, as KVM hands it out (opaque bytes of the kernel's structs, so a restore on
the same host kernel gives back exactly what was read):

- per vCPU: ``KVM_GET_REGS``, ``KVM_GET_SREGS``, ``KVM_GET_XSAVE`` (else ``KVM_GET_FPU``),
  ``KVM_GET_XCRS``, every MSR of ``KVM_GET_MSR_INDEX_LIST`` that ``KVM_GET_MSRS`` reads,
  ``KVM_GET_LAPIC``, ``KVM_GET_VCPU_EVENTS`` (pending exceptions, interrupts, NMIs),
  ``KVM_GET_MP_STATE``, ``KVM_GET_DEBUGREGS``;
- per VM: ``KVM_GET_IRQCHIP`` (PIC master, PIC slave, IOAPIC), ``KVM_GET_PIT2``,
  ``KVM_GET_CLOCK`` (kvmclock).

An ioctl this host's KVM refuses is not fatal where the guest can live without it: the
name and the error go to ``refused`` (the snapshot records them, ``vmrun snapshot``
reports them) and that part keeps the fresh VM's value.
"""

from __future__ import annotations

import base64
import errno
from typing import TYPE_CHECKING, Any

from vmrun.core import kvm

if TYPE_CHECKING:
    from vmrun.core.vcpu import Vcpu
    from vmrun.core.vm import Vm

ffi = kvm.ffi
ffi.cdef("""
struct kvm_irqchip { __u32 chip_id; __u32 pad; char chip[512]; };
struct kvm_pit_state2 { char data[112]; };
struct kvm_clock_data { __u64 clock; __u32 flags; __u32 pad0; __u64 realtime; __u64 host_tsc;
                        __u32 pad[4]; };
struct kvm_xsave { __u32 region[1024]; };
struct kvm_xcrs { char data[392]; };
struct kvm_debugregs { char data[128]; };
""")
_ior, _iow, _iowr = kvm._ior, kvm._iow, kvm._iowr
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
for _name, _value in list(globals().items()):
    if _name.startswith("KVM_") and isinstance(_value, int):
        kvm._IOCTL_NAMES.setdefault(_value, _name)



def get_clock(vm_fd: int) -> int:
    """The guest's kvmclock now, in nanoseconds (``KVM_GET_CLOCK``)."""
    clock = ffi.new("struct kvm_clock_data *")
    kvm.ioctl(vm_fd, KVM_GET_CLOCK, clock)
    return clock.clock


def set_clock(vm_fd: int, ns: int) -> None:
    """Set the guest's kvmclock (``KVM_SET_CLOCK``): it goes on from ``ns``."""
    clock = ffi.new("struct kvm_clock_data *")
    clock.clock = ns
    kvm.ioctl(vm_fd, KVM_SET_CLOCK, clock)


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_CLOCK_TSC_STABLE = 2
MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE = 0x10, 0x6E0
#: A TSC read back within this many cycles of the value written was taken (~10 ms at 5 GHz).
TSC_SLACK = 50_000_000
VERSION = 1

# Per-vCPU parts: (name, struct, get, set). Order is the restore order (QEMU's).
_VCPU_PARTS = [
    ("regs", "struct kvm_regs", kvm.KVM_GET_REGS, kvm.KVM_SET_REGS),
    ("xsave", "struct kvm_xsave", KVM_GET_XSAVE, KVM_SET_XSAVE),
    ("xcrs", "struct kvm_xcrs", KVM_GET_XCRS, KVM_SET_XCRS),
    ("sregs", "struct kvm_sregs", kvm.KVM_GET_SREGS, kvm.KVM_SET_SREGS),
]
_VCPU_LATE_PARTS = [
    ("mp_state", "struct kvm_mp_state", kvm.KVM_GET_MP_STATE, kvm.KVM_SET_MP_STATE),
    ("lapic", "struct kvm_lapic_state", kvm.KVM_GET_LAPIC, kvm.KVM_SET_LAPIC),
    ("events", "struct kvm_vcpu_events", kvm.KVM_GET_VCPU_EVENTS, kvm.KVM_SET_VCPU_EVENTS),
    ("debugregs", "struct kvm_debugregs", KVM_GET_DEBUGREGS, KVM_SET_DEBUGREGS),
]


def _b64(cdata: Any) -> str:
    return base64.b64encode(bytes(ffi.buffer(cdata))).decode()


def _unb64(ctype: str, text: str) -> Any:
    raw = base64.b64decode(text)
    obj = ffi.new(ctype + " *")
    buf = ffi.buffer(obj)
    if len(raw) != len(buf):
        raise ValueError(f"{ctype}: {len(raw)} bytes saved, {len(buf)} expected")
    buf[:] = raw
    return obj


class KvmState:
    """Save and restore one VM's KVM state; ``refused`` lists what this host's KVM would
    not do (``"KVM_GET_XSAVE: Invalid argument"``), ``skipped_msrs`` the MSRs it would not
    read or write."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self.skipped_msrs: list[int] = []

    # -- saving ---------------------------------------------------------------------------------
    def _get(self, fd: int, name: str, ctype: str, request: int) -> str | None:
        obj = ffi.new(ctype + " *")
        try:
            kvm.ioctl(fd, request, obj)
        except OSError as e:
            self.refused.append(f"{name}: {e}")
            return None
        return _b64(obj)

    def msr_indices(self, kvm_fd: int) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0})
        try:
            kvm.ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, probe)
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise
        n = probe.nmsrs
        full = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        full.nmsrs = n
        kvm.ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, full)
        return [full.indices[i] for i in range(full.nmsrs)]

    def _get_msrs(self, vcpu: Vcpu, indices: list[int]) -> dict[str, int]:
        """Every MSR KVM reads; KVM_GET_MSRS stops at the first it refuses: skip that one."""
        out: dict[str, int] = {}
        todo = list(indices)
        while todo:
            n = len(todo)
            buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
            buf.nmsrs = n
            for i, index in enumerate(todo):
                buf.entries[i].index = index
            done = kvm.ioctl(vcpu.fd, kvm.KVM_GET_MSRS, buf)
            for i in range(done):
                out[f"{buf.entries[i].index:#x}"] = buf.entries[i].data
            if done < n:
                self.skipped_msrs.append(todo[done])
            todo = todo[done + 1:]
        return out

    def save_vcpu(self, vcpu: Vcpu, msr_indices: list[int]) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for name, ctype, get, _set in _VCPU_PARTS + _VCPU_LATE_PARTS:
            value = self._get(vcpu.fd, f"vcpu{vcpu.index} {name}", ctype, get)
            if value is not None:
                state[name] = value
        if "xsave" not in state:
            fpu = self._get(vcpu.fd, f"vcpu{vcpu.index} fpu", "struct kvm_fpu", kvm.KVM_GET_FPU)
            if fpu is not None:
                state["fpu"] = fpu
        state["msrs"] = self._get_msrs(vcpu, msr_indices)
        return state

    def save(self, vm: Vm) -> dict[str, Any]:
        """The whole VM's KVM state (its vCPUs must be paused)."""
        indices = self.msr_indices(vm.kvm_fd)
        state: dict[str, Any] = {"version": VERSION, "irqchip": {}}
        if vm.irqchip:
            for chip in (0, 1, 2):         # PIC master, PIC slave, IOAPIC
                obj = ffi.new("struct kvm_irqchip *")
                obj.chip_id = chip
                try:
                    kvm.ioctl(vm.fd, KVM_GET_IRQCHIP, obj)
                    state["irqchip"][str(chip)] = _b64(obj)
                except OSError as e:
                    self.refused.append(f"irqchip {chip}: {e}")
            pit = self._get(vm.fd, "pit", "struct kvm_pit_state2", KVM_GET_PIT2)
            if pit is not None:
                state["pit"] = pit
        try:
            state["clock"] = vm.paused_clock if vm.paused_clock is not None else \
                get_clock(vm.fd)
        except OSError as e:
            self.refused.append(f"clock: {e}")
        state["vcpus"] = [self.save_vcpu(v, indices) for v in vm.vcpus]
        state["refused"] = list(self.refused)
        state["skipped_msrs"] = [f"{m:#x}" for m in self.skipped_msrs]
        return state

    # -- restoring ------------------------------------------------------------------------------
    def _set(self, fd: int, name: str, ctype: str, request: int, text: str) -> None:
        obj = _unb64(ctype, text)
        if ctype == "struct kvm_vcpu_events":
            obj.flags |= (KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR
                          | KVM_VCPUEVENT_VALID_SHADOW)
        try:
            kvm.ioctl(fd, request, obj)
        except OSError as e:
            self.refused.append(f"{name}: {e}")

    def _set_msrs(self, vcpu: Vcpu, msrs: dict[str, int]) -> None:
        todo = [(int(k, 16), v) for k, v in msrs.items()]
        while todo:
            n = len(todo)
            buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
            buf.nmsrs = n
            for i, (index, value) in enumerate(todo):
                buf.entries[i].index = index
                buf.entries[i].data = value
            done = kvm.ioctl(vcpu.fd, kvm.KVM_SET_MSRS, buf)
            if done < n:
                self.skipped_msrs.append(todo[done][0])
            todo = todo[done + 1:]

    def _check_tsc(self, vcpu: Vcpu, saved: int) -> None:
        """Did KVM take the guest's TSC? kvm-pvm ignores the write (the guest TSC is the
        host's): a guest keeping time by its TSC then sees the time since the snapshot
        pass at once. Said in ``refused``, as an ioctl that did not work; kvm-clock, which
        KVM_SET_CLOCK restores, is not affected."""
        now = vcpu.get_msr(MSR_IA32_TSC)
        if not 0 <= now - saved < TSC_SLACK:
            self.refused.append(f"vcpu{vcpu.index} TSC: KVM_SET_MSRS left it "
                                f"{now - saved:+d} cycles from the saved value (the guest's "
                                f"TSC clock jumps; use clocksource=kvm-clock)")

    def restore_vcpu(self, vcpu: Vcpu, state: dict[str, Any]) -> None:
        for name, ctype, _get, set_ in _VCPU_PARTS:
            if name in state:
                self._set(vcpu.fd, f"vcpu{vcpu.index} {name}", ctype, set_, state[name])
        if "fpu" in state:
            self._set(vcpu.fd, f"vcpu{vcpu.index} fpu", "struct kvm_fpu", kvm.KVM_SET_FPU,
                      state["fpu"])
        msrs = dict(state.get("msrs", {}))
        deadline = msrs.pop(f"{MSR_IA32_TSC_DEADLINE:#x}", None)
        self._set_msrs(vcpu, msrs)
        tsc = msrs.get(f"{MSR_IA32_TSC:#x}")
        if tsc is not None:
            self._check_tsc(vcpu, tsc)
        for name, ctype, _get, set_ in _VCPU_LATE_PARTS:
            if name in state:
                self._set(vcpu.fd, f"vcpu{vcpu.index} {name}", ctype, set_, state[name])
            if name == "lapic" and deadline is not None:
                # After KVM_SET_LAPIC, which cancels the LAPIC timer (QEMU's order too):
                # set before it, the guest's TSC-deadline timer is lost and a tickless
                # guest sleeps for good.
                self._set_msrs(vcpu, {f"{MSR_IA32_TSC_DEADLINE:#x}": deadline})

    def restore(self, vm: Vm, state: dict[str, Any]) -> None:
        if state.get("version") != VERSION:
            raise ValueError(f"KVM state version {state.get('version')!r}, not {VERSION}")
        if len(state["vcpus"]) != len(vm.vcpus):
            raise ValueError(f"{len(state['vcpus'])} vCPUs saved, the VM has {len(vm.vcpus)}")
        if vm.irqchip:
            for chip, text in state.get("irqchip", {}).items():
                self._set(vm.fd, f"irqchip {chip}", "struct kvm_irqchip", KVM_SET_IRQCHIP,
                          text)
            if "pit" in state:
                self._set(vm.fd, "pit", "struct kvm_pit_state2", KVM_SET_PIT2, state["pit"])
        if "clock" in state:
            try:
                set_clock(vm.fd, state["clock"])
            except OSError as e:
                self.refused.append(f"clock: {e}")
        for vcpu, vstate in zip(vm.vcpus, state["vcpus"], strict=True):
            self.restore_vcpu(vcpu, vstate)
