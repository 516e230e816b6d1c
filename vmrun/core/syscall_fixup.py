"""Repairing system calls on KVMs that deliver them wrongly (seen on kvm-pvm).

On a software-assisted KVM where guest user code runs natively, a CPL3 ``syscall`` lands at
the guest's LSTAR but *still at CPL3*, so the kernel's entry page faults (the process is killed
and, for init, the kernel panics); ``int 0x80`` arrives as #UD. Both mistakes end in a guest
exception handler that KVM runs at CPL0, and that is where vmrun steps in, with hardware
breakpoints (KVM_SET_GUEST_DEBUG) on the guest's #PF and #UD handlers:

- #PF whose frame says "user mode, RIP = LSTAR = CR2": a SYSCALL that never switched to CPL0.
  vmrun finishes it as the CPU should have: CS/SS from STAR, RIP = LSTAR, the user RSP and the
  already masked RFLAGS (RCX and R11 were set correctly), and resumes the kernel at its entry.
- #UD whose frame points at ``cd 80`` in user mode: an ``int 0x80``. The frame is the one the
  gate would have pushed; vmrun advances its RIP past the instruction and resumes at the IDT's
  0x80 handler.
- Anything else is a real fault: vmrun single-steps the handler's first instruction with the
  breakpoints off and re-arms them (two extra exits per genuine #PF/#UD).

The breakpoints follow the guest's IDT, re-read on a periodic kick. :func:`needed` runs a tiny
probe guest once per process: on a KVM that gets SYSCALL right (any real host) nothing of this
is switched on.
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING

from vmrun.core import kvm

if TYPE_CHECKING:
    from vmrun.core.vcpu import Vcpu

ffi = kvm.ffi
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
RFLAGS_RF = 1 << 16
PF_VECTOR, UD_VECTOR, INT80_VECTOR = 14, 6, 0x80
DR7_ENABLE = 0x400 | (1 << 1) | (1 << 3)     # G0, G1: execute breakpoints on DR0, DR1
KERNEL_HALF = 0xFFFF_8000_0000_0000


def read_linear(vcpu: Vcpu, addr: int, length: int) -> bytes | None:
    """Read guest-virtual memory through the vCPU's current page tables (None if unmapped)."""
    out = bytearray()
    while len(out) < length:
        tr = ffi.new("struct kvm_translation *")
        tr.linear_address = addr
        try:
            kvm.ioctl(vcpu.fd, kvm.KVM_TRANSLATE, tr)
        except OSError:
            return None
        n = min(length - len(out), 0x1000 - (addr & 0xFFF))
        mem = vcpu.vm.memory
        if not tr.valid or not mem.contains(tr.physical_address, n):
            return None
        out += mem.read(tr.physical_address, n)
        addr += n
    return bytes(out)


def write_linear(vcpu: Vcpu, addr: int, data: bytes) -> bool:
    tr = ffi.new("struct kvm_translation *")
    tr.linear_address = addr
    kvm.ioctl(vcpu.fd, kvm.KVM_TRANSLATE, tr)
    if not tr.valid or (addr & 0xFFF) + len(data) > 0x1000 or \
            not vcpu.vm.memory.contains(tr.physical_address, len(data)):
        return False
    vcpu.vm.memory.write(tr.physical_address, data)
    return True


class SyscallFixup:
    """Per vCPU: the breakpoints and the repair of the two broken deliveries."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.pf_handler = 0
        self.ud_handler = 0
        self.stepping = False
        self.repaired = {"syscall": 0, "int80": 0}

    def _gate(self, idt_base: int, vector: int) -> int:
        raw = read_linear(self.vcpu, idt_base + 16 * vector, 16)
        if raw is None:
            return 0
        lo, sel, _ist, _type, mid, hi, _ = struct.unpack("<HHBBHII", raw)
        return lo | (mid << 16) | (hi << 32)

    def refresh(self) -> None:
        """Follow the guest's IDT (called on a periodic kick, on the vCPU thread)."""
        s = self.vcpu.get_sregs()
        if s.idt.limit < 16 * PF_VECTOR + 15 or self.stepping:
            return
        pf, ud = self._gate(s.idt.base, PF_VECTOR), self._gate(s.idt.base, UD_VECTOR)
        if pf >= KERNEL_HALF and ud >= KERNEL_HALF and (pf, ud) != (self.pf_handler,
                                                                   self.ud_handler):
            self.pf_handler, self.ud_handler = pf, ud
            self._arm()

    def _set_debug(self, control: int, dr0: int = 0, dr1: int = 0, dr7: int = 0x400) -> None:
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        dbg.arch.debugreg[0] = dr0
        dbg.arch.debugreg[1] = dr1
        dbg.arch.debugreg[7] = dr7
        kvm.ioctl(self.vcpu.fd, kvm.KVM_SET_GUEST_DEBUG, dbg)

    def _arm(self) -> None:
        self._set_debug(kvm.KVM_GUESTDBG_ENABLE | kvm.KVM_GUESTDBG_USE_HW_BP,
                        self.pf_handler, self.ud_handler, DR7_ENABLE)

    def on_debug_exit(self) -> bool:
        """A KVM_EXIT_DEBUG: returns False if it was not ours."""
        if self.stepping:
            self.stepping = False
            self._arm()
            return True
        regs = self.vcpu.get_regs()
        if not self.pf_handler or regs.rip not in (self.pf_handler, self.ud_handler):
            return False
        if regs.rip == self.pf_handler and self._repair_syscall(regs):
            return True
        if regs.rip == self.ud_handler and self._repair_int80(regs):
            return True
        self.stepping = True
        self._set_debug(kvm.KVM_GUESTDBG_ENABLE | kvm.KVM_GUESTDBG_SINGLESTEP)
        return True

    def _repair_syscall(self, regs) -> bool:
        frame = read_linear(self.vcpu, regs.rsp, 48)
        if frame is None:
            return False
        _err, rip, cs, rflags, rsp, _ss = struct.unpack("<6Q", frame)
        if cs & 3 != 3:
            return False
        sregs = self.vcpu.get_sregs()
        if rip != self.vcpu.get_msr(MSR_LSTAR) or sregs.cr2 != rip:
            return False
        kernel_cs = (self.vcpu.get_msr(MSR_STAR) >> 32) & 0xFFFC
        _segment(sregs.cs, kernel_cs, code=True)
        _segment(sregs.ss, kernel_cs + 8, code=False)
        self.vcpu.set_sregs(sregs)
        regs.rip = rip
        regs.rsp = rsp
        regs.rflags = rflags & ~RFLAGS_RF
        self.vcpu.set_regs(regs)
        self.repaired["syscall"] += 1
        return True

    def _repair_int80(self, regs) -> bool:
        frame = read_linear(self.vcpu, regs.rsp, 40)
        if frame is None:
            return False
        rip, cs, _rflags, _rsp, _ss = struct.unpack("<5Q", frame)
        if cs & 3 != 3 or read_linear(self.vcpu, rip, 2) != b"\xcd\x80":
            return False
        sregs = self.vcpu.get_sregs()
        handler = self._gate(sregs.idt.base, INT80_VECTOR)
        if handler < KERNEL_HALF or not write_linear(self.vcpu, regs.rsp,
                                                     struct.pack("<Q", rip + 2)):
            return False
        regs.rip = handler
        self.vcpu.set_regs(regs)
        self.repaired["int80"] += 1
        return True


def _segment(seg, selector: int, code: bool) -> None:
    seg.selector = selector
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.type = 0xB if code else 0x3
    seg.present = 1
    seg.dpl = 0
    seg.s = 1
    seg.l = 1 if code else 0
    seg.db = 0 if code else 1
    seg.g = 1
    seg.unusable = 0


_needed: bool | None = None
_needed_lock = threading.Lock()


def needed() -> bool:
    """Does this host's KVM leave a CPL3 SYSCALL at CPL3? (probed once per process)"""
    global _needed
    with _needed_lock:
        if _needed is None:
            _needed = _probe()
        return _needed


def _probe() -> bool:
    """A user-mode ``syscall`` into a supervisor-only LSTAR page; on a correct KVM the handler
    runs at CPL0 and writes to a port, on a broken one the fetch faults (no IDT: shutdown)."""
    from vmrun.core.vm import Vm

    vm = Vm(4 << 20, 1, irqchip=False)
    try:
        mem = vm.memory
        mem.write(0x1000, b"\x0f\x05\xeb\xfe")                              # syscall; jmp $
        mem.write(0x205000, b"\xe6\x10\xf4")                                # out 0x10, al; hlt
        mem.write(0x2000, struct.pack("<Q", 0x3000 | 7))
        mem.write(0x3000, struct.pack("<Q", 0x4000 | 7))
        mem.write(0x4000, struct.pack("<QQ", 0x87, 0x200000 | 0x83))        # user, supervisor
        gdt = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF,
               0x00AFFB000000FFFF]
        mem.write(0x6000, struct.pack("<5Q", *gdt))
        v = vm.vcpus[0]
        s = v.get_sregs()
        s.cr3, s.cr4, s.efer, s.cr0 = 0x2000, 1 << 5, 0x501, 0x80050033
        s.gdt.base, s.gdt.limit = 0x6000, 5 * 8 - 1
        for name, sel, code in (("cs", 0x23, True), ("ss", 0x1B, False), ("ds", 0x1B, False),
                                ("es", 0x1B, False)):
            seg = getattr(s, name)
            _segment(seg, sel, code)
            seg.dpl = 3
        v.set_sregs(s)
        v.set_msrs({MSR_STAR: (0x10 << 48) | (0x08 << 32), MSR_LSTAR: 0x205000,
                    0xC0000084: 0x700})
        r = ffi.new("struct kvm_regs *")
        r.rflags, r.rip, r.rsp = 0x202, 0x1000, 0x8000
        v.set_regs(r)
        kvm.ioctl(v.fd, kvm.KVM_RUN, 0)
        return v.run.exit_reason != kvm.KVM_EXIT_IO
    finally:
        vm.close()
