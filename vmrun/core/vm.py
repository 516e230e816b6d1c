"""A KVM virtual machine: its fd, RAM slots, in-kernel interrupt controllers, buses and vCPUs.

This is the machine-independent part: what a TOML file turns into is assembled by
:mod:`vmrun.machine`. Start-up follows kvmtool's idea of init levels: the VM and its memory,
then the interrupt controllers, then devices, then firmware tables and the kernel, then vCPUs.
Ending is one-way: the first :meth:`Vm.request_exit` wins, every vCPU is kicked out of KVM_RUN
and :meth:`Vm.wait` returns the exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from vmrun.core import kvm
from vmrun.core.bus import MmioBus, PortBus
from vmrun.core.cpuid import feature_settings, shape_cpuid, supported_cpuid
from vmrun.core.exits import ExitCode, VmExit
from vmrun.core.irq import BoardIrqLine, IrqLines
from vmrun.core.kvmstate import get_clock, set_clock
from vmrun.core.memory import GuestMemory
from vmrun.core.vcpu import Vcpu

TSS_ADDR = 0xFFFB_D000
# KVM memory slot numbers for device RAM (RAM-backed PCI BARs): above guest RAM's slots.
RAM_BAR_SLOTS_START, RAM_BAR_SLOTS_END = 16, 32
IDENTITY_MAP_ADDR = 0xFFFB_C000
log = logging.getLogger("vmrun.vm")


@dataclass
class VmStats:
    emulated: dict[str, int] = field(default_factory=dict)


@dataclass
class ExitInfo:
    code: ExitCode
    reason: str
    detail: str = ""


def _ignore_signal(signum: int, frame: object) -> None:
    """SIGUSR1 only exists to interrupt KVM_RUN on a vCPU thread."""


def _unhandled_port(port: int, size: int, value: int | None) -> None:
    what = "read" if value is None else f"write of {value:#x}"
    raise VmExit(ExitCode.ERROR, f"unhandled I/O port {port:#x} ({what}, {size} bytes; "
                 "on_unhandled_io = \"exit\")")


class Vm:
    def __init__(self, memory_size: int, ncpus: int = 1, *, irqchip: bool = True,
                 cpu_profile: str = "host", cpu_features: dict[str, bool] | None = None,
                 exit_on_unhandled_io: bool = False, syscall_fixup: bool = False,
                 huge_pages: bool = True) -> None:
        self.kvm_fd = kvm.open_kvm()
        self.fd = -1
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        self.stopping = False
        self.exit_info: ExitInfo | None = None
        self._exit_event = threading.Event()
        self._exit_lock = threading.Lock()
        # pause()/resume(): vCPUs park on this condition outside KVM_RUN (see Vcpu.loop).
        self.paused = False
        self.paused_clock: int | None = None   # kvmclock at pause(), set back at resume()
        self._pause_cond = threading.Condition()
        self._parked = 0
        self.stats = VmStats()
        self.exit_on_unhandled_io = exit_on_unhandled_io
        self.irqchip = irqchip
        self.syscall_fixup = syscall_fixup
        self.pio = PortBus()
        if exit_on_unhandled_io:
            self.pio.unclaimed.on_access = _unhandled_port
        self.mmio = MmioBus()
        self._irq_lock = threading.Lock()
        self.irq_lines = IrqLines(self.set_irq_line)
        self._next_gsi = 24
        self._msi_routes: dict[int, tuple[int, int]] = {}
        self._free_memslots = list(range(RAM_BAR_SLOTS_START, RAM_BAR_SLOTS_END))
        try:
            self.fd = kvm.ioctl(self.kvm_fd, kvm.KVM_CREATE_VM, 0)
            kvm.ioctl(self.fd, kvm.KVM_SET_TSS_ADDR, TSS_ADDR)
            ident = kvm.ffi.new("__u64 *", IDENTITY_MAP_ADDR)
            kvm.ioctl(self.fd, kvm.KVM_SET_IDENTITY_MAP_ADDR, ident)
            if irqchip:
                kvm.ioctl(self.fd, kvm.KVM_CREATE_IRQCHIP)
                pit = kvm.ffi.new("struct kvm_pit_config *")
                pit.flags = kvm.KVM_PIT_SPEAKER_DUMMY
                kvm.ioctl(self.fd, kvm.KVM_CREATE_PIT2, pit)
            self.memory = GuestMemory.for_size(memory_size, huge_pages)
            for slot in self.memory.slots:
                region = kvm.ffi.new("struct kvm_userspace_memory_region *")
                region.slot = slot.index
                region.guest_phys_addr = slot.gpa
                region.memory_size = slot.size
                region.userspace_addr = self.memory.host_address(slot)
                kvm.ioctl(self.fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
            features = feature_settings(cpu_profile, cpu_features or {})
            supported = supported_cpuid(self.kvm_fd)
            for i in range(ncpus):
                vcpu = Vcpu(self, i)
                self.vcpus.append(vcpu)
                vcpu.set_cpuid(shape_cpuid(supported, i, ncpus, features))
                vcpu.setup_boot_msrs()
                vcpu.setup_hwcr()
                vcpu.setup_fpu()
                if irqchip:
                    vcpu.setup_lapic()
        except BaseException:
            self.close()
            raise

    # -- device RAM: extra memory slots (a RAM-backed PCI BAR) ------------------------
    def add_memslot(self, gpa: int, size: int, hva: int, *, log_dirty: bool = False) -> int:
        """Map ``size`` bytes of host memory at ``hva`` into the guest at ``gpa`` (guest
        accesses then never exit); returns the slot number for :meth:`remove_memslot` and
        :meth:`get_dirty_log`. Raises :class:`~vmrun.core.kvm.KvmError` (EEXIST) when the
        range overlaps another slot."""
        if not self._free_memslots:
            raise kvm.KvmError(28, "no free KVM memory slot for device RAM")
        slot = self._free_memslots[0]
        self._set_region(slot, gpa, size, hva, kvm.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        self._free_memslots.remove(slot)
        return slot

    def remove_memslot(self, slot: int) -> None:
        self._set_region(slot, 0, 0, 0, 0)      # memory_size 0 deletes the slot
        self._free_memslots.append(slot)

    def _set_region(self, slot: int, gpa: int, size: int, hva: int, flags: int) -> None:
        region = kvm.ffi.new("struct kvm_userspace_memory_region *")
        region.slot, region.flags = slot, flags
        region.guest_phys_addr, region.memory_size, region.userspace_addr = gpa, size, hva
        kvm.ioctl(self.fd, kvm.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """The pages of ``slot`` (``size`` bytes) the guest wrote since the last call, one
        bit per 4 KiB page (KVM_GET_DIRTY_LOG, which also re-arms the log)."""
        npages = (size + 4095) // 4096
        bitmap = kvm.ffi.new("uint64_t[]", max(1, (npages + 63) // 64))
        log = kvm.ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = int(kvm.ffi.cast("uintptr_t", bitmap))
        kvm.ioctl(self.fd, kvm.KVM_GET_DIRTY_LOG, log)
        return bytes(kvm.ffi.buffer(bitmap))[:(npages + 7) // 8]

    # -- interrupts ----------------------------------------------------------------
    def set_irq_line(self, gsi: int, level: int) -> None:
        """Drive an input of the in-kernel PIC and IOAPIC (ISA IRQs are GSIs 0-15)."""
        irq = kvm.ffi.new("struct kvm_irq_level *")
        irq.irq = gsi
        irq.level = level
        kvm.ioctl(self.fd, kvm.KVM_IRQ_LINE, irq)

    def irq_line(self, gsi: int, *, level_triggered: bool = False) -> BoardIrqLine:
        """A device's interrupt pin into ``gsi`` (see :class:`~vmrun.core.irq.IrqLines`:
        lines sharing a GSI are ORed; ``level_triggered`` for PCI INTx and the SCI)."""
        return self.irq_lines.line(gsi, level_triggered=level_triggered)

    # -- MSI routes and irqfds ------------------------------------------------------------
    def allocate_msi_gsi(self) -> int:
        """A GSI above the IOAPIC's pins, for one MSI/MSI-X vector."""
        with self._irq_lock:
            gsi = self._next_gsi
            self._next_gsi += 1
            return gsi

    def set_msi_route(self, gsi: int, address: int, data: int | None) -> None:
        """Route ``gsi`` to an MSI message (None removes it) and push the table to KVM.

        KVM_SET_GSI_ROUTING replaces the whole table, so the default PIC/IOAPIC routes for
        GSIs 0-23 are always included.
        """
        with self._irq_lock:
            if data is None:
                self._msi_routes.pop(gsi, None)
            else:
                self._msi_routes[gsi] = (address, data)
            routes = dict(self._msi_routes)
            n = 16 + 24 - 1 + len(routes)   # PIC pins 0-15 (minus cascade 2) + IOAPIC 0-23
            table = kvm.ffi.new("struct kvm_irq_routing *", {"nr": n, "entries": n})
            table.nr = n
            i = 0
            for pin in range(16):
                if pin == 2:
                    continue
                e = table.entries[i]
                e.gsi, e.type = pin, kvm.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = kvm.KVM_IRQCHIP_PIC_MASTER if pin < 8 else \
                    kvm.KVM_IRQCHIP_PIC_SLAVE
                e.u.irqchip.pin = pin % 8
                i += 1
            for pin in range(24):
                e = table.entries[i]
                e.gsi, e.type = pin, kvm.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = kvm.KVM_IRQCHIP_IOAPIC
                e.u.irqchip.pin = pin
                i += 1
            for g, (addr, dat) in routes.items():
                e = table.entries[i]
                e.gsi, e.type = g, kvm.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = addr & 0xFFFFFFFF
                e.u.msi.address_hi = addr >> 32
                e.u.msi.data = dat
                i += 1
            kvm.ioctl(self.fd, kvm.KVM_SET_GSI_ROUTING, table)

    def register_irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """Let a write to eventfd ``fd`` inject ``gsi`` inside KVM (no exit, no VMM thread)."""
        irqfd = kvm.ffi.new("struct kvm_irqfd *")
        irqfd.fd = fd
        irqfd.gsi = gsi
        irqfd.flags = kvm.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        kvm.ioctl(self.fd, kvm.KVM_IRQFD, irqfd)

    def register_ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                           datamatch: int | None = None, deassign: bool = False) -> None:
        """Have KVM signal eventfd ``fd`` on a guest write to ``addr`` instead of exiting."""
        ev = kvm.ffi.new("struct kvm_ioeventfd *")
        ev.addr = addr
        ev.len = length
        ev.fd = fd
        flags = 0
        if pio:
            flags |= kvm.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= kvm.KVM_IOEVENTFD_FLAG_DATAMATCH
            ev.datamatch = datamatch
        if deassign:
            flags |= kvm.KVM_IOEVENTFD_FLAG_DEASSIGN
        ev.flags = flags
        kvm.ioctl(self.fd, kvm.KVM_IOEVENTFD, ev)

    def signal_msi(self, address: int, data: int) -> None:
        msi = kvm.ffi.new("struct kvm_msi *")
        msi.address_lo = address & 0xFFFFFFFF
        msi.address_hi = address >> 32
        msi.data = data
        kvm.ioctl(self.fd, kvm.KVM_SIGNAL_MSI, msi)

    # -- lifetime -------------------------------------------------------------------
    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, _ignore_signal)
        if self.syscall_fixup:
            from vmrun.core.syscall_fixup import SyscallFixup

            for vcpu in self.vcpus:
                vcpu.fixup = SyscallFixup(vcpu)
            threading.Thread(target=self._service_kicker, name="vcpu-service",
                             daemon=True).start()
        for vcpu in self.vcpus:
            vcpu.start()

    def _service_kicker(self) -> None:
        """Kick every vCPU once a second so per-vCPU upkeep (the syscall fix-up following the
        guest's IDT) runs on its own thread."""
        while not self._exit_event.wait(1.0):
            for vcpu in self.vcpus:
                vcpu.kick()

    def pause(self, timeout: float = 5.0) -> bool:
        """Stop every vCPU outside KVM_RUN (QMP ``stop``): each is kicked and parks until
        :meth:`resume`; True once all that run have parked (False on timeout or if the VM
        is ending). Devices and their event loop go on. The guest's kvmclock stands still
        until :meth:`resume` (as QEMU's does): a guest keeping time by it sees no time pass
        while it was stopped (its TSC runs on: this is KVM's clock, not the CPU's)."""
        with self._pause_cond:
            self.paused = True
        for vcpu in self.vcpus:
            vcpu.kick()
        with self._pause_cond:
            parked = self._pause_cond.wait_for(
                lambda: self.stopping or self._parked >= self._running_vcpus(), timeout) \
                and not self.stopping
            if parked and self.paused_clock is None:
                try:
                    self.paused_clock = get_clock(self.fd)
                except OSError as e:      # a KVM without it: the clock simply runs on
                    log.warning("kvmclock: KVM_GET_CLOCK refused (%s); it runs on while "
                                "paused", e)
            return parked

    def _running_vcpus(self) -> int:
        return sum(1 for v in self.vcpus if v.thread is not None and v.thread.is_alive())

    def resume(self) -> None:
        with self._pause_cond:
            if self.paused_clock is not None:
                try:
                    set_clock(self.fd, self.paused_clock)
                except OSError as e:
                    log.warning("kvmclock: KVM_SET_CLOCK refused (%s); the guest's clock "
                                "jumped by the pause", e)
                self.paused_clock = None
            self.paused = False
            self._pause_cond.notify_all()

    def park(self) -> None:
        """Called by a vCPU thread that found :attr:`paused` set: wait until resumed or
        ending."""
        with self._pause_cond:
            if not self.paused or self.stopping:
                return
            self._parked += 1
            self._pause_cond.notify_all()
            try:
                self._pause_cond.wait_for(lambda: not self.paused or self.stopping)
            finally:
                self._parked -= 1

    def request_exit(self, code: ExitCode, reason: str, detail: str = "") -> None:
        """End the VM (first caller wins); safe from any thread."""
        with self._exit_lock:
            if self.exit_info is None:
                self.exit_info = ExitInfo(ExitCode(code), reason, detail)
            self.stopping = True
        with self._pause_cond:
            self._pause_cond.notify_all()
        for vcpu in self.vcpus:
            if vcpu.thread is not threading.current_thread():
                vcpu.kick()
        self._exit_event.set()

    def wait(self, timeout: float | None = None) -> ExitInfo | None:
        """Block until the VM ends; returns how it ended (None on timeout)."""
        if not self._exit_event.wait(timeout):
            return None
        for vcpu in self.vcpus:
            t = vcpu.thread
            while t is not None and t.is_alive():
                vcpu.kick()
                t.join(0.05)
        return self.exit_info

    def close(self) -> None:
        for vcpu in self.vcpus:
            try:
                vcpu.close()
            except OSError as e:
                print(f"vmrun: closing vcpu{vcpu.index}: {e}", file=sys.stderr)
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.kvm_fd >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1
