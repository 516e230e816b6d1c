"""Tiny purpose-made guests for KVM tests: a few hand-assembled 64-bit instructions at CPL0.

They spend almost no time in guest kernel mode, so they run fast even where KVM emulates
kernel code. :func:`long_mode_vm` sets up identity page tables, a GDT and an IDT whose
vectors (the 32 exceptions, and any interrupt vector a handler is given for) point at the
``handlers`` given, loads ``code`` at :data:`CODE` and points RIP at it.
"""

from __future__ import annotations

import struct

from vmrun.core import layout
from vmrun.core.boot import EntryState
from vmrun.core.vm import Vm

CODE = 0x10000          # guest code
HANDLERS = 0x20000      # exception handlers: 0x100 bytes each, by vector
IDT = 0x30000
STACK = 0x40000
MEMORY = 2 * layout.MiB


# -- a few x86-64 encodings used by the tests (named after their mnemonics) --------------
def mov_al(imm: int) -> bytes:
    return bytes([0xB0, imm & 0xFF])


def mov_eax(imm: int) -> bytes:
    return b"\xb8" + struct.pack("<I", imm & 0xFFFFFFFF)


def mov_dx(imm: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", imm)


def out_dx_al() -> bytes:
    return b"\xee"


def out_dx_eax() -> bytes:
    return b"\xef"


def in_al_dx() -> bytes:
    return b"\xec"


def out_imm_al(port: int) -> bytes:
    return bytes([0xE6, port])


def mov_abs_eax_store(addr: int) -> bytes:
    """mov dword [addr32], eax"""
    return b"\x89\x04\x25" + struct.pack("<I", addr)


def mov_abs_eax_load(addr: int) -> bytes:
    """mov eax, dword [addr32]"""
    return b"\x8b\x04\x25" + struct.pack("<I", addr)


def mov_rax_rsp_top() -> bytes:
    """mov rax, [rsp]"""
    return b"\x48\x8b\x04\x24"


HLT = b"\xf4"
CLI = b"\xfa"
INT3 = b"\xcc"
UD2 = b"\x0f\x0b"
IRETQ = b"\x48\xcf"
JMP_SELF = b"\xeb\xfe"


def report(port: int, value: int) -> bytes:
    """out port, eax with eax = value (32-bit)."""
    return mov_eax(value) + mov_dx(port) + out_dx_eax()


def long_mode_vm(code: bytes, handlers: dict[int, bytes] | None = None, *, irqchip: bool = False,
                 idt: bool = True, memory: int = MEMORY, ncpus: int = 1) -> Vm:
    """A VM whose BSP starts in 64-bit mode at CPL0 running ``code``."""
    vm = Vm(memory, ncpus, irqchip=irqchip)
    mem = vm.memory
    assert mem is not None
    mem.write(CODE, code)
    entries = bytearray()
    for vector in range(max(32, max(handlers or {0: b""}) + 1)):
        body = (handlers or {}).get(vector)
        target = HANDLERS + vector * 0x100
        if body is not None:
            mem.write(target, body)
        else:
            # Unexpected exception: report the vector on port 0xF4+? No: halt with a marker.
            mem.write(target, report(layout.BOOT_MARKER_PORT, 0xE0 + vector) + CLI + HLT)
        # 64-bit interrupt gate: selector 0x10, type 0xE, present, DPL 0.
        entries += struct.pack("<HHBBHII", target & 0xFFFF, 0x10, 0, 0x8E,
                               (target >> 16) & 0xFFFF, target >> 32, 0)
    mem.write(IDT, bytes(entries))
    vcpu = vm.vcpus[0]
    vcpu.set_entry_state(EntryState(mode="long64", rip=CODE, regs={"rsp": STACK}))
    if idt:
        sregs = vcpu.get_sregs()
        sregs.idt.base = IDT
        sregs.idt.limit = len(entries) - 1
        vcpu.set_sregs(sregs)
    return vm
