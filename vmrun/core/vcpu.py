"""A vCPU: its KVM fd, its kvm_run page, its start state, and the exit loop on its own thread.

The loop is the hot path: an I/O-port exit costs one ``KVM_RUN`` (which releases the GIL), one
list index into the port bus and one device method call. Exits the VMM cannot serve end the
VM with bhyve's exit codes (see :mod:`vmrun.core.exits`).
"""

from __future__ import annotations

import errno
import logging
import mmap
import struct
import threading
from typing import TYPE_CHECKING

from vmrun.core import kvm, kvmrun, layout
from vmrun.core.boot import EntryState
from vmrun.core.emulate import handle_emulation_failure
from vmrun.core.exits import ExitCode, VmExit

if TYPE_CHECKING:
    from vmrun.core.vm import Vm

ffi = kvm.ffi
log = logging.getLogger("vmrun.vcpu")
libc = kvm.libc

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_K7_HWCR = 0xC0010015
HWCR_TSC_FREQ_SEL = 1 << 24
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


class Vcpu:
    def __init__(self, vm: Vm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = kvm.ioctl(vm.fd, kvm.KVM_CREATE_VCPU, index)
        size = kvm.ioctl(vm.kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE)
        self.run_mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = ffi.cast("struct kvm_run *", ffi.from_buffer(self.run_mm))
        self.thread: threading.Thread | None = None
        self.exits = 0
        self.fixup = None   # a SyscallFixup where the host's KVM needs one
        self.cpuid: list[dict[str, int]] = []   # what set_cpuid gave the guest

    def close(self) -> None:
        import os

        self.run = None
        try:
            self.run_mm.close()
        except BufferError:
            pass
        os.close(self.fd)

    # -- set-up ------------------------------------------------------------------
    def set_cpuid(self, entries: list[dict[str, int]]) -> None:
        from vmrun.core.cpuid import set_vcpu_cpuid

        set_vcpu_cpuid(self.fd, entries)
        self.cpuid = [dict(e) for e in entries]

    def set_msrs(self, msrs: dict[int, int]) -> None:
        n = len(msrs)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        buf.nmsrs = n
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = value
        done = kvm.ioctl(self.fd, kvm.KVM_SET_MSRS, buf)
        if done != n:
            failed = list(msrs)[done]
            raise kvm.KvmError(errno.EINVAL, f"KVM_SET_MSRS: MSR {failed:#x} was refused")

    def get_msr(self, index: int) -> int:
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": 1, "entries": 1})
        buf.entries[0].index = index
        kvm.ioctl(self.fd, kvm.KVM_GET_MSRS, buf)
        return buf.entries[0].data

    def setup_boot_msrs(self) -> None:
        self.set_msrs({
            MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
            MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
            MSR_IA32_TSC: 0,
            MSR_IA32_MISC_ENABLE: 1,                # fast strings
            MSR_MTRR_DEF_TYPE: (1 << 11) | 6,       # MTRRs on, default write-back
        })

    def setup_hwcr(self) -> None:
        """AMD's HWCR.TscFreqSel: the TSC counts at the P0 frequency, as on real parts (Linux
        reports a firmware bug otherwise). Hosts whose KVM refuses it keep the default."""
        try:
            self.set_msrs({MSR_K7_HWCR: self.get_msr(MSR_K7_HWCR) | HWCR_TSC_FREQ_SEL})
        except OSError:
            pass

    def setup_lapic(self) -> None:
        """LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves them."""
        state = ffi.new("struct kvm_lapic_state *")
        kvm.ioctl(self.fd, kvm.KVM_GET_LAPIC, state)
        regs = ffi.buffer(state.regs)
        for off, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
            v = struct.unpack_from("<I", regs, off)[0]
            v = (v & ~0x700) | (mode << 8)
            struct.pack_into("<I", regs, off, v)
        kvm.ioctl(self.fd, kvm.KVM_SET_LAPIC, state)

    def setup_fpu(self) -> None:
        fpu = ffi.new("struct kvm_fpu *")
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        kvm.ioctl(self.fd, kvm.KVM_SET_FPU, fpu)

    def get_regs(self):  # -> cdata struct kvm_regs
        regs = ffi.new("struct kvm_regs *")
        kvm.ioctl(self.fd, kvm.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs) -> None:
        kvm.ioctl(self.fd, kvm.KVM_SET_REGS, regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        kvm.ioctl(self.fd, kvm.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        kvm.ioctl(self.fd, kvm.KVM_SET_SREGS, sregs)

    def set_entry_state(self, entry: EntryState) -> None:
        """Put the BSP in the state the boot protocol asks for."""
        mem = self.vm.memory
        sregs = self.get_sregs()
        code = dict(base=0, limit=0xFFFFFFFF, selector=0x10, type=0xB, present=1, dpl=0, db=1,
                    s=1, l=0, g=1)
        data = dict(base=0, limit=0xFFFFFFFF, selector=0x18, type=0x3, present=1, dpl=0, db=1,
                    s=1, l=0, g=1)
        tss = dict(base=0, limit=0x67, selector=0x20, type=0xB, present=1, dpl=0, db=0, s=0,
                   l=0, g=0)
        if entry.mode == "long64":
            code.update(db=0, l=1)
            gdt_code = 0x00AF9B000000FFFF
            self._write_identity_page_tables()
            sregs.cr3 = layout.PML4_START
            sregs.cr4 = CR4_PAE
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
            sregs.efer = EFER_LME | EFER_LMA
        else:
            gdt_code = 0x00CF9B000000FFFF
            sregs.cr0 = CR0_PE | CR0_ET
            sregs.cr4 = 0
            sregs.efer = 0
        gdt = [0, 0, gdt_code, 0x00CF93000000FFFF, 0x00008B0000000067]
        mem.write(layout.BOOT_GDT, struct.pack("<5Q", *gdt))
        mem.write(layout.BOOT_IDT, bytes(8))
        sregs.gdt.base = layout.BOOT_GDT
        sregs.gdt.limit = len(gdt) * 8 - 1
        sregs.idt.base = layout.BOOT_IDT
        sregs.idt.limit = 7
        for name in ("cs",):
            _set_seg(getattr(sregs, name), code)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _set_seg(getattr(sregs, name), data)
        _set_seg(sregs.tr, tss)
        self.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        regs.rflags = 2
        regs.rip = entry.rip
        regs.rbx = entry.rbx
        regs.rsi = entry.rsi
        regs.rsp = layout.BOOT_STACK
        for k, v in entry.regs.items():
            setattr(regs, k, v)
        self.set_regs(regs)

    def _write_identity_page_tables(self) -> None:
        """Identity-map the first 4 GiB with 2 MiB pages (PML4, one PDPT, four PDs)."""
        mem = self.vm.memory
        pml4 = layout.PML4_START
        pdpt = pml4 + 0x1000
        pd = pml4 + 0x2000
        mem.write(pml4, struct.pack("<Q", pdpt | 3) + bytes(4088))
        mem.write(pdpt, b"".join(struct.pack("<Q", (pd + i * 0x1000) | 3) for i in range(4))
                  + bytes(4096 - 32))
        mem.write(pd, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(2048)))

    # -- running -------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}",
                                       daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return soon (immediate_exit + a signal to the thread)."""
        import signal

        if self.run is not None:
            self.run.immediate_exit = 1
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def _thread_main(self) -> None:
        try:
            self.loop()
        except VmExit as e:
            self.vm.request_exit(e.code, e.reason)
        except BaseException as e:  # a VMM bug: end the VM, say what happened
            import traceback

            self.vm.request_exit(ExitCode.ERROR, f"vcpu{self.index}: internal error: {e!r}",
                                 detail=traceback.format_exc())

    def loop(self) -> None:
        """Run the vCPU until the VM stops. Hot path: read the exit straight from the
        kvm_run page (one struct unpack), then for a port one list index into the port bus,
        for MMIO one dict lookup in the MMIO bus's page cache, and one device call."""
        vm = self.vm
        run = self.run
        fd = self.fd
        # KVM_RUN: the compiled shim (returns -errno) where it could be built, else the cffi
        # ABI-mode ioctl (returns -1, errno in ffi.errno). Either releases the GIL.
        native = kvmrun.native_kvm_run()
        kvm_run, run_args = ((native, (fd,)) if native is not None else
                             (libc.ioctl, (fd, kvm.KVM_RUN, ffi.cast("unsigned long", 0))))
        EXIT_IO = kvm.KVM_EXIT_IO
        EXIT_MMIO = kvm.KVM_EXIT_MMIO
        pio_slots = vm.pio.slots
        pio = vm.pio
        mmio = vm.mmio
        page = memoryview(self.run_mm)
        page32 = page.cast("I")
        views = {1: page, 2: page.cast("H"), 4: page.cast("I")}
        io_hdr = struct.Struct("<BBHIQ")
        io_unpack = io_hdr.unpack_from
        # struct kvm_run's mmio member at 32: u64 phys_addr, u8 data[8] (read as one
        # little-endian u64), u32 len, u8 is_write. A read's answer goes back into data.
        mmio_unpack = struct.Struct("<QQIB").unpack_from
        mmio_data = page.cast("Q")  # [5] is data, at offset 40
        mmio_page = mmio.pages.get  # page number -> (base, read, write); the bus clears it
        mmio_lookup = mmio.lookup
        masks = [(1 << (8 * n)) - 1 for n in range(9)]
        if vm.paused:
            vm.park()           # started while paused (QMP stop before a reboot)
        if self.fixup is not None:
            # Armed before the first entry, not on the first kick a second later: a restored
            # guest may make its next system call at once.
            self.fixup.refresh()
        while not vm.stopping:
            if (err := kvm_run(*run_args)) < 0:
                err = -err if native is not None else ffi.errno
                if err in (errno.EINTR, errno.EAGAIN):
                    run.immediate_exit = 0
                    if vm.paused:   # Vm.pause() set it, then kicked: park outside KVM_RUN
                        vm.park()
                    if self.fixup is not None and not vm.stopping:
                        self.fixup.refresh()
                    continue
                raise VmExit(ExitCode.ERROR, f"vcpu{self.index}: KVM_RUN failed: "
                             f"{errno.errorcode.get(err, err)}")
            reason = page32[2]
            if reason == EXIT_IO:
                direction, size, port, count, off = io_unpack(page, 32)
                if count == 1:
                    dev, base = pio_slots[port]
                    if direction:
                        dev.write(port - base, size, views[size][off // size])
                    else:
                        views[size][off // size] = dev.read(port - base, size) & \
                            ((1 << (8 * size)) - 1)
                else:
                    self._string_io(direction, size, port, count, off, page, pio)
            elif reason == EXIT_MMIO:
                addr, data, n, is_write = mmio_unpack(page, 32)
                base, read, write = mmio_page(addr >> 12) or mmio_lookup(addr)
                if is_write:
                    write(addr - base, n, data & masks[n])
                else:
                    mmio_data[5] = read(addr - base, n) & masks[n]
            else:
                self._other_exit(reason)

    def _string_io(self, direction: int, size: int, port: int, count: int, off: int,
                   page: memoryview, pio) -> None:
        """rep ins/outs: ``count`` accesses through the page."""
        mask = (1 << (8 * size)) - 1
        for i in range(count):
            at = off + i * size
            if direction:
                pio.write(port, size, int.from_bytes(page[at:at + size], "little"))
            else:
                page[at:at + size] = (pio.read(port, size) & mask).to_bytes(size, "little")

    def _other_exit(self, reason: int) -> None:
        run = self.run
        if reason == kvm.KVM_EXIT_HLT:
            raise VmExit(ExitCode.HALT, f"vcpu{self.index} halted")
        if reason == kvm.KVM_EXIT_SHUTDOWN:
            raise VmExit(ExitCode.TRIPLE_FAULT, f"vcpu{self.index}: triple fault "
                         f"(KVM_EXIT_SHUTDOWN)\n{self.describe()}")
        if reason == kvm.KVM_EXIT_SYSTEM_EVENT:
            t = run.system_event.type
            if t == kvm.KVM_SYSTEM_EVENT_RESET:
                raise VmExit(ExitCode.RESET, "guest reset")
            if t == kvm.KVM_SYSTEM_EVENT_SHUTDOWN:
                raise VmExit(ExitCode.POWER_OFF, "guest powered off")
            raise VmExit(ExitCode.ERROR, f"vcpu{self.index}: system event {t}")
        if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            handle_emulation_failure(self)
            return
        if reason == kvm.KVM_EXIT_INTR:
            return
        if reason == kvm.KVM_EXIT_DEBUG and self.fixup is not None and \
                self.fixup.on_debug_exit():
            return
        if reason == kvm.KVM_EXIT_FAIL_ENTRY:
            raise VmExit(ExitCode.ERROR, f"vcpu{self.index}: VM entry failed, hardware reason "
                         f"{run.fail_entry.hardware_entry_failure_reason:#x}\n{self.describe()}")
        name = kvm.EXIT_REASON_NAMES.get(reason, str(reason))
        raise VmExit(ExitCode.ERROR, f"vcpu{self.index}: unexpected exit {name}\n"
                     f"{self.describe()}")

    def describe(self) -> str:
        """Registers, for error reports."""
        try:
            r = self.get_regs()
            s = self.get_sregs()
        except OSError as e:
            return f"(registers unavailable: {e})"
        names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                 "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
        lines = []
        for i in range(0, len(names), 4):
            lines.append("  " + "  ".join(f"{n:>6}={getattr(r, n):016x}" for n in names[i:i + 4]))
        lines.append(f"      cs={s.cs.selector:04x} (dpl {s.cs.dpl}, l {s.cs.l}) "
                     f"ss={s.ss.selector:04x}"
                     f"  cr0={s.cr0:x} cr2={s.cr2:x} cr3={s.cr3:x} cr4={s.cr4:x} efer={s.efer:x}")
        return "\n".join(lines)


def _set_seg(seg, values: dict[str, int]) -> None:
    for k, v in values.items():
        setattr(seg, k, v)
    seg.unusable = 0
