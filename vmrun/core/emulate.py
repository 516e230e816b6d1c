"""What to do when KVM's in-kernel instruction emulator gives up (KVM_EXIT_INTERNAL_ERROR).

On a software-assisted KVM (kvm-pvm) guest kernel code is emulated instruction by instruction,
and the emulator does not know every instruction. A good VMM decodes the failing instruction and
finishes the job where that is safe:

- ``int3``: inject #BP (Linux runs an INT3 self-test at boot);
- ``clac``/``stac``: flip RFLAGS.AC;
- ``fnclex``/``fclex``, ``emms``: x87 state changes done through KVM_GET/SET_FPU; ``fwait``
  (no x87 exception is ever pending here) only advances RIP;

and for anything else ends the VM with the instruction bytes and registers, never hanging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmrun.core import kvm
from vmrun.core.exits import ExitCode, VmExit

if TYPE_CHECKING:
    from vmrun.core.vcpu import Vcpu

ffi = kvm.ffi
RFLAGS_AC = 1 << 18
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


def decode(insn: bytes) -> tuple[str, int] | None:
    """(mnemonic, length) for the instructions we know how to finish, else None."""
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
    if not fwait and rest[:2] == b"\x0f\x77":
        return "emms", 2
    if fwait:
        return "fwait", 1
    return None


def inject_exception(vcpu: Vcpu, vector: int) -> None:
    events = ffi.new("struct kvm_vcpu_events *")
    kvm.ioctl(vcpu.fd, kvm.KVM_GET_VCPU_EVENTS, events)
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = 0
    events.exception.pending = 0
    events.flags = 0
    kvm.ioctl(vcpu.fd, kvm.KVM_SET_VCPU_EVENTS, events)


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
    elif mnemonic in ("fnclex", "fclex", "emms"):
        # (fwait, which waits for pending x87 exceptions vmrun never raises, only advances
        # RIP: no FPU state round trip through KVM for it.)
        fpu = ffi.new("struct kvm_fpu *")
        kvm.ioctl(vcpu.fd, kvm.KVM_GET_FPU, fpu)
        if mnemonic in ("fnclex", "fclex"):
            fpu.fsw &= ~0x80FF          # exception flags, ES and B
        elif mnemonic == "emms":
            fpu.ftwx = 0                # abridged tag word: all registers empty
        kvm.ioctl(vcpu.fd, kvm.KVM_SET_FPU, fpu)
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
        if known is not None:
            vcpu.vm.stats.emulated[known[0]] = vcpu.vm.stats.emulated.get(known[0], 0) + 1
            emulate(vcpu, known[0], known[1], regs)
            return
    what = SUBERROR_NAMES.get(sub, f"suberror {sub}")
    data = " ".join(f"{run.internal.data[i]:#x}" for i in range(min(run.internal.ndata, 16)))
    raise VmExit(ExitCode.ERROR,
                 f"vcpu{vcpu.index}: KVM internal error ({what}) at rip {regs.rip:#x}, "
                 f"instruction bytes: {insn.hex(' ') or 'unreadable'}"
                 f"{' (data: ' + data + ')' if data else ''}\n{vcpu.describe()}")
