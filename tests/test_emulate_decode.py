"""The instruction decoder behind vmrun's finishing of what KVM's emulator cannot do
(vmrun/core/emulate.py): ldmxcsr/stmxcsr memory operands as Linux's code has them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmrun.core.emulate import GPR_NAMES, decode, decode_mxcsr_op


def regs(**values: int) -> SimpleNamespace:
    return SimpleNamespace(**{name: values.get(name, 0) for name in GPR_NAMES})


SREGS = SimpleNamespace(fs=SimpleNamespace(base=0x7000_0000), gs=SimpleNamespace(base=0x8000))


@pytest.mark.parametrize("code, mnemonic, length, address", [
    # kernel_fpu_begin_mask (Debian 6.1): ldmxcsr [rsp+4]
    ("0f ae 54 24 04", "ldmxcsr", 5, 0x1000 + 4),
    ("0f ae 5c 24 fc", "stmxcsr", 5, 0x1000 - 4),
    ("41 0f ae 55 00", "ldmxcsr", 5, 0x5000),                   # [r13+0]
    ("0f ae 15 10 00 00 00", "ldmxcsr", 7, 0x400007 + 0x10),    # [rip+0x10]
    ("65 0f ae 14 25 00 10 00 00", "ldmxcsr", 9, 0x8000 + 0x1000),   # gs:[0x1000]
    ("0f ae 94 c8 00 01 00 00", "ldmxcsr", 8, 0x2000 + 0x10 * 8 + 0x100),  # [rax+rcx*8+256]
    ("43 0f ae 1c 04", "stmxcsr", 5, 0x3000 + 0x20),            # [r12+r8]
    ("64 0f ae 18", "stmxcsr", 4, 0x7000_0000 + 0x2000),        # fs:[rax]
])
def test_mxcsr_operands(code: str, mnemonic: str, length: int, address: int) -> None:
    insn = bytes.fromhex(code) + b"\x90" * 8
    got = decode_mxcsr_op(insn)
    assert got is not None
    name, n, mem = got
    assert (name, n) == (mnemonic, length)
    assert decode(insn) == (mnemonic, length)
    r = regs(rsp=0x1000, r13=0x5000, rax=0x2000, rcx=0x10, r12=0x3000, r8=0x20)
    rip = 0x400000
    assert mem.address(r, SREGS, rip + n) == address


@pytest.mark.parametrize("code", [
    "0f ae f0",          # mfence: a register form
    "0f ae 3c 24",       # clflush [rsp]: /7
    "0f ae 04 24",       # fxsave [rsp]: /0, not finished by vmrun
    "0f ae 54",          # truncated
    "0f ae",
    "66 0f ae 54 24 04",  # an operand-size prefix: not an encoding Linux emits
])
def test_not_mxcsr(code: str) -> None:
    assert decode_mxcsr_op(bytes.fromhex(code)) is None


@given(st.binary(min_size=0, max_size=15))
def test_any_bytes_decode_or_say_none(insn: bytes) -> None:
    """A guest decides the bytes: the decoder never raises and never claims more bytes than
    it was given."""
    got = decode(insn)
    if got is not None:
        assert 0 < got[1] <= len(insn)
    mx = decode_mxcsr_op(insn)
    if mx is not None:
        assert mx[1] <= len(insn)
        mx[2].address(regs(), SREGS, 0)
