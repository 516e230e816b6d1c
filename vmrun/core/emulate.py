"""What to do when KVM's in-kernel instruction emulator gives up (KVM_EXIT_INTERNAL_ERROR).

On a software-assisted KVM (kvm-pvm) guest kernel code is emulated instruction by instruction,
and the emulator does not know every instruction. A good VMM decodes the failing instruction and
finishes the job where that is safe:

- ``int3``: inject #BP (Linux runs an INT3 self-test at boot);
- ``clac``/``stac``: flip RFLAGS.AC;
- ``fninit``/``finit``, ``fnclex``/``fclex``, ``emms``: x87 state changes; ``fwait`` (no x87
  exception is ever pending here) only advances RIP;
- ``ldmxcsr``/``stmxcsr`` m32 in 64-bit code (Linux's ``kernel_fpu_begin`` loads the default
  MXCSR whenever the kernel uses SSE): the operand's address from its ModRM/SIB bytes and the
  registers, the memory through the guest's page tables, MXCSR through KVM_GET/SET_FPU; a
  value with reserved bits set is #GP(0), SSE off (CR0.EM, no CR4.OSFXSR) #UD and CR0.TS
  #NM, as the CPU raises them;

The x87/SSE state goes through KVM_GET/SET_XSAVE (its legacy FXSAVE area), not
KVM_GET/SET_FPU: on this project's kvm-pvm host KVM_GET_FPU reads MXCSR as 0 (so a
read-modify-write through it would clear the guest's MXCSR), and a control word set with
KVM_SET_FPU before the vCPU first ran was not what the guest's ``fnstcw`` saw; XSAVE's area
is the guest's (tests/test_kvm_guests.py checks what the guest sees). KVM_GET/SET_FPU remains
the way on a KVM without XSAVE.

and for anything else ends the VM with the instruction bytes and registers, never hanging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmrun.core import kvm, kvmstate
from vmrun.core.exits import ExitCode, VmExit

if TYPE_CHECKING:
    from vmrun.core.vcpu import Vcpu

ffi = kvm.ffi
RFLAGS_AC = 1 << 18
EFER_LMA = 1 << 10
CR0_EM, CR0_TS, CR4_OSFXSR = 1 << 2, 1 << 3, 1 << 9
UD_VECTOR, NM_VECTOR = 6, 7
BP_VECTOR = 3
# KVM's behaviour when a soft exception (#BP) is injected through KVM_SET_VCPU_EVENTS differs
# between implementations: some push the RIP they were given, others skip the instruction
# themselves. Probed once per process (see probe_int3_semantics) and cached here.
_int3_rip_advance: int | None = None

SUBERROR_NAMES = {
    kvm.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    kvm.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    kvm.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure",
}


def read_guest_code(vcpu: Vcpu, rip: int, cs_base: int, length: int = 15) -> bytes:
    """Fetch up to ``length`` instruction bytes at CS:RIP through the guest's page tables."""
    out = bytearray()
    linear = (cs_base + rip) & 0xFFFF_FFFF_FFFF_FFFF
    while len(out) < length:
        tr = ffi.new("struct kvm_translation *")
        tr.linear_address = linear
        try:
            kvm.ioctl(vcpu.fd, kvm.KVM_TRANSLATE, tr)
        except OSError:
            break
        if not tr.valid:
            break
        chunk = min(length - len(out), 0x1000 - (linear & 0xFFF))
        gpa = tr.physical_address
        if not vcpu.vm.memory.contains(gpa, chunk):
            break
        out += vcpu.vm.memory.read(gpa, chunk)
        linear += chunk
    return bytes(out)


# ModRM/SIB register numbers -> struct kvm_regs fields.
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
MXCSR_MASK = 0xFFFF          # the bits LDMXCSR accepts (with DAZ, as every x86-64 CPU has)
GP_VECTOR = 13


class MemOperand:
    """A decoded ModRM memory operand: ``base + index * scale + disp`` (RIP-relative when
    ``rip_relative``: from the next instruction), in the segment ``seg`` ("fs", "gs" or None)."""

    def __init__(self, base: int | None, index: int | None, scale: int, disp: int,
                 rip_relative: bool, seg: str | None) -> None:
        self.base, self.index, self.scale, self.disp = base, index, scale, disp
        self.rip_relative, self.seg = rip_relative, seg

    def address(self, regs, sregs, next_rip: int) -> int:
        ea = self.disp
        if self.rip_relative:
            ea += next_rip
        if self.base is not None:
            ea += getattr(regs, GPR_NAMES[self.base])
        if self.index is not None:
            ea += getattr(regs, GPR_NAMES[self.index]) * self.scale
        if self.seg is not None:
            ea += getattr(sregs, self.seg).base
        return ea & 0xFFFF_FFFF_FFFF_FFFF


def decode_modrm(insn: bytes, i: int, rex: int, seg: str | None
                 ) -> tuple[int, MemOperand | None, int] | None:
    """The ModRM at ``insn[i]`` (64-bit addressing): (reg field, memory operand or None for a
    register operand, length of ModRM + SIB + displacement); None when the bytes run out."""
    if i >= len(insn):
        return None
    modrm = insn[i]
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        return reg, None, 1
    n = 1
    base: int | None = rm | (rex & 1) << 3
    index: int | None = None
    scale = 1
    rip_relative = False
    if rm == 4:
        if i + 1 >= len(insn):
            return None
        sib = insn[i + 1]
        n = 2
        scale = 1 << (sib >> 6)
        idx = (sib >> 3) & 7 | (rex & 2) << 2
        index = None if idx == 4 else idx
        base = sib & 7 | (rex & 1) << 3
        if sib & 7 == 5 and mod == 0:
            base = None                 # disp32, no base
            mod = 2                     # (read a 32-bit displacement below)
    elif rm == 5 and mod == 0:
        base = None
        rip_relative = True
        mod = 2
    size = {0: 0, 1: 1, 2: 4}[mod]
    if i + n + size > len(insn):
        return None
    disp = int.from_bytes(insn[i + n:i + n + size], "little", signed=True) if size else 0
    return reg, MemOperand(base, index, scale, disp, rip_relative, seg), n + size


def decode_mxcsr_op(insn: bytes) -> tuple[str, int, MemOperand] | None:
    """``ldmxcsr``/``stmxcsr`` m32 (0F AE /2, /3), with an optional FS/GS override and REX."""
    i = 0
    seg = None
    while i < len(insn) and insn[i] in (0x64, 0x65):
        seg = "fs" if insn[i] == 0x64 else "gs"
        i += 1
    rex = 0
    if i < len(insn) and 0x40 <= insn[i] <= 0x4F:
        rex = insn[i]
        i += 1
    if insn[i:i + 2] != b"\x0f\xae":
        return None
    got = decode_modrm(insn, i + 2, rex, seg)
    if got is None:
        return None
    reg, mem, n = got
    if mem is None or reg not in (2, 3):
        return None
    return ("ldmxcsr" if reg == 2 else "stmxcsr"), i + 2 + n, mem


def decode(insn: bytes) -> tuple[str, int] | None:
    """(mnemonic, length) for the instructions we know how to finish, else None."""
    mx = decode_mxcsr_op(insn)
    if mx is not None:
        return mx[0], mx[1]
    i = 0
    fwait = False
    if insn[:1] == b"\x9b":
        fwait = True
        i = 1
    rest = insn[i:]
    if not fwait and rest[:1] == b"\xcc":
        return "int3", 1
    if not fwait and rest[:3] == b"\x0f\x01\xca":
        return "clac", 3
    if not fwait and rest[:3] == b"\x0f\x01\xcb":
        return "stac", 3
    if rest[:2] == b"\xdb\xe2":
        return ("fclex" if fwait else "fnclex"), i + 2
    if rest[:2] == b"\xdb\xe3":
        return ("finit" if fwait else "fninit"), i + 2
    if not fwait and rest[:2] == b"\x0f\x77":
        return "emms", 2
    if fwait:
        return "fwait", 1
    return None


def inject_exception(vcpu: Vcpu, vector: int, error_code: int | None = None) -> None:
    events = ffi.new("struct kvm_vcpu_events *")
    kvm.ioctl(vcpu.fd, kvm.KVM_GET_VCPU_EVENTS, events)
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = 0 if error_code is None else 1
    events.exception.error_code = error_code or 0
    events.exception.pending = 0
    events.flags = 0
    kvm.ioctl(vcpu.fd, kvm.KVM_SET_VCPU_EVENTS, events)


class FpuControl:
    """The vCPU's x87 and SSE control registers, read once and written back by
    :meth:`commit`: through the XSAVE area where KVM has it (see the module's docstring),
    else through struct kvm_fpu."""

    # name: (offset in the FXSAVE/XSAVE legacy area, size, XSTATE_BV bit, kvm_fpu field)
    FIELDS = {
        "fcw": (0, 2, 0, "fcw"), "fsw": (2, 2, 0, "fsw"), "ftw": (4, 1, 0, "ftwx"),
        "fop": (6, 2, 0, "last_opcode"), "fip": (8, 8, 0, "last_ip"),
        "fdp": (16, 8, 0, "last_dp"), "mxcsr": (24, 4, 1, "mxcsr"),
    }
    XSTATE_BV = 512

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.xsave = ffi.new("struct kvm_xsave *")
        try:
            kvm.ioctl(vcpu.fd, kvmstate.KVM_GET_XSAVE, self.xsave)
            self.buf = ffi.buffer(self.xsave)
        except OSError:
            self.xsave = None
            self.fpu = ffi.new("struct kvm_fpu *")
            kvm.ioctl(vcpu.fd, kvm.KVM_GET_FPU, self.fpu)

    def __getitem__(self, name: str) -> int:
        off, size, _, field = self.FIELDS[name]
        if self.xsave is None:
            return int(getattr(self.fpu, field))
        return int.from_bytes(self.buf[off:off + size], "little")

    def __setitem__(self, name: str, value: int) -> None:
        off, size, bit, field = self.FIELDS[name]
        if self.xsave is None:
            setattr(self.fpu, field, value)
            return
        self.buf[off:off + size] = value.to_bytes(size, "little")
        # A component whose XSTATE_BV bit is clear is loaded in its initial state: mark it.
        bv = self.XSTATE_BV
        self.buf[bv:bv + 1] = bytes([self.buf[bv:bv + 1][0] | 1 << bit])

    def commit(self) -> None:
        if self.xsave is None:
            kvm.ioctl(self.vcpu.fd, kvm.KVM_SET_FPU, self.fpu)
        else:
            kvm.ioctl(self.vcpu.fd, kvmstate.KVM_SET_XSAVE, self.xsave)


def translate(vcpu: Vcpu, linear: int, length: int) -> list[tuple[int, int]] | None:
    """Guest-physical (address, length) pieces of ``length`` bytes at a linear address, or
    None where a page is not mapped or not RAM."""
    out = []
    while length:
        tr = ffi.new("struct kvm_translation *")
        tr.linear_address = linear
        try:
            kvm.ioctl(vcpu.fd, kvm.KVM_TRANSLATE, tr)
        except OSError:
            return None
        chunk = min(length, 0x1000 - (linear & 0xFFF))
        if not tr.valid or not vcpu.vm.memory.contains(tr.physical_address, chunk):
            return None
        out.append((tr.physical_address, chunk))
        linear = (linear + chunk) & 0xFFFF_FFFF_FFFF_FFFF
        length -= chunk
    return out


def emulate_mxcsr(vcpu: Vcpu, insn: bytes, regs) -> bool:
    """Finish ``ldmxcsr``/``stmxcsr``; False when the operand is not in mapped RAM (the
    caller then reports the failure: a page fault here is not ours to fake)."""
    mnemonic, length, mem = decode_mxcsr_op(insn)
    sregs = vcpu.get_sregs()
    if sregs.cr0 & CR0_EM or not sregs.cr4 & CR4_OSFXSR:
        inject_exception(vcpu, UD_VECTOR)            # what the CPU does: SSE is off
        return True
    if sregs.cr0 & CR0_TS:
        inject_exception(vcpu, NM_VECTOR)            # lazy FPU switch: the kernel's to do
        return True
    pieces = translate(vcpu, mem.address(regs, sregs, regs.rip + length), 4)
    if pieces is None:
        return False
    memory = vcpu.vm.memory
    fpu = FpuControl(vcpu)
    if mnemonic == "ldmxcsr":
        value = int.from_bytes(b"".join(memory.read(gpa, n) for gpa, n in pieces), "little")
        if value & ~MXCSR_MASK:
            inject_exception(vcpu, GP_VECTOR, error_code=0)
            return True
        fpu["mxcsr"] = value
        fpu.commit()
    else:
        data = fpu["mxcsr"].to_bytes(4, "little")
        pos = 0
        for gpa, n in pieces:
            memory.write(gpa, data[pos:pos + n])
            pos += n
    regs.rip += length
    vcpu.set_regs(regs)
    return True


def emulate(vcpu: Vcpu, mnemonic: str, length: int, regs) -> None:
    if mnemonic == "int3":
        # #BP is a trap: the handler sees RIP after the int3.
        regs.rip += length
        vcpu.set_regs(regs)
        inject_exception(vcpu, BP_VECTOR)
        return
    if mnemonic in ("clac", "stac"):
        if mnemonic == "clac":
            regs.rflags &= ~RFLAGS_AC
        else:
            regs.rflags |= RFLAGS_AC
    elif mnemonic in ("fninit", "finit", "fnclex", "fclex", "emms"):
        # (fwait, which waits for pending x87 exceptions vmrun never raises, only advances
        # RIP: no FPU state round trip through KVM for it.)
        fpu = FpuControl(vcpu)
        if mnemonic in ("fninit", "finit"):
            # The x87 reset: control word 0x37F, status and tags cleared (all registers
            # empty: the abridged tag word is 0), last instruction and data pointers zero.
            for name, value in (("fcw", 0x37F), ("fsw", 0), ("ftw", 0), ("fop", 0),
                                ("fip", 0), ("fdp", 0)):
                fpu[name] = value
        elif mnemonic in ("fnclex", "fclex"):
            fpu["fsw"] = fpu["fsw"] & ~0x80FF    # exception flags, ES and B
        else:
            fpu["ftw"] = 0                       # emms: abridged tag word, all empty
        fpu.commit()
    regs.rip += length
    vcpu.set_regs(regs)


def handle_emulation_failure(vcpu: Vcpu) -> None:
    """Finish the instruction KVM could not, or end the VM with a precise report."""
    run = vcpu.run
    sub = run.internal.suberror
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    insn = read_guest_code(vcpu, regs.rip, sregs.cs.base)
    if sub == kvm.KVM_INTERNAL_ERROR_EMULATION and insn:
        known = decode(insn)
        long_mode = sregs.cs.l and sregs.efer & EFER_LMA
        if known is not None and known[0] in ("ldmxcsr", "stmxcsr"):
            if long_mode and emulate_mxcsr(vcpu, insn, regs):
                vcpu.vm.stats.emulated[known[0]] = vcpu.vm.stats.emulated.get(known[0], 0) + 1
                return
        elif known is not None:
            vcpu.vm.stats.emulated[known[0]] = vcpu.vm.stats.emulated.get(known[0], 0) + 1
            emulate(vcpu, known[0], known[1], regs)
            return
    what = SUBERROR_NAMES.get(sub, f"suberror {sub}")
    data = " ".join(f"{run.internal.data[i]:#x}" for i in range(min(run.internal.ndata, 16)))
    raise VmExit(ExitCode.ERROR,
                 f"vcpu{vcpu.index}: KVM internal error ({what}) at rip {regs.rip:#x}, "
                 f"instruction bytes: {insn.hex(' ') or 'unreadable'}"
                 f"{' (data: ' + data + ')' if data else ''}\n{vcpu.describe()}")
