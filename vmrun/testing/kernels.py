"""Synthetic "kernels" for boot-protocol tests: a PVH ELF and a bzImage, a few bytes of code.

They let the loaders and the entry state be tested on KVM in milliseconds: each kernel's code
reports what it was handed (the start-info / zero-page address and fields of them) on a port,
then does whatever ending the test asks for (power off through PM1, reset through 0xCF9 or the
i8042, a triple fault, a halt).
"""

from __future__ import annotations

import struct

from vmrun.core import layout

REPORT_PORT = 0x510   # 32-bit values the kernel reports, in order

# 32-bit code (PVH entry: protected mode, paging off).
def _out32(value_reg_code: bytes) -> bytes:
    return value_reg_code + b"\x66\xba" + struct.pack("<H", REPORT_PORT) + b"\xef"


ENDINGS_32 = {
    # mov dx, PM1a_CNT; mov ax, SLP_TYP_S5<<10 | SLP_EN; out dx, ax
    "poweroff": b"\x66\xba" + struct.pack("<H", layout.PM1A_CNT_PORT) + b"\x66\xb8"
                + struct.pack("<H", (layout.SLP_TYP_S5 << 10) | (1 << 13)) + b"\x66\xef",
    # mov dx, 0xCF9; mov al, 6; out dx, al
    "reset": b"\x66\xba" + struct.pack("<H", layout.RESET_PORT) + b"\xb0\x06\xee",
    # mov al, 0xFE; out 0x64, al
    "kbd_reset": b"\xb0\xfe\xe6\x64",
    # lidt [zero]; int3 -> no IDT -> triple fault
    "triple_fault": b"\x0f\x01\x1d" + struct.pack("<I", 0x5F0) + b"\xcc",
    # mov al, V; out 0xF4, al
    "debug_exit_2": b"\xb0\x02\xe6\xf4",
}
# mov dx, COM1; then mov al, c; out dx, al for each byte of "half" (no newline): the console
# is left mid-line before the triple fault.
ENDINGS_32["half_line_triple_fault"] = (
    b"\x66\xba\xf8\x03" + b"".join(b"\xb0" + bytes([c]) + b"\xee" for c in b"half")
    + ENDINGS_32["triple_fault"])


def pvh_elf(ending: str = "poweroff", entry: int = 0x100000) -> bytes:
    """An x86-64 ELF whose PVH entry reports ebx (start info), then the start info's magic,
    nr_modules, cmdline_paddr and memmap_entries, then ends as asked."""
    code = b""
    code += _out32(b"\x89\xd8")                        # mov eax, ebx
    for off in (0, 12, 24, 48):                         # magic, nr_modules, cmdline, memmap n
        code += _out32(b"\x8b\x43" + bytes([off]))      # mov eax, [ebx+off]
    code += b"\xf3\x90" * 0 + ENDINGS_32[ending] + b"\xf4\xeb\xfd"
    note_name = b"Xen\0"
    note = struct.pack("<III", len(note_name), 4, 18) + note_name + struct.pack("<I", entry)
    ehdr_size, phdr_size = 64, 56
    phoff = ehdr_size
    code_off = 0x1000
    note_off = phoff + 2 * phdr_size
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, ehdr_size, phdr_size,
                        2, 0, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, entry, entry, len(code), len(code) + 0x100,
                       0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    image = bytearray(ehdr + load + pnote + note)
    image += bytes(code_off - len(image))
    image += code
    return bytes(image)


def bzimage(ending: str = "poweroff", version: int = 0x020F, xloadflags: int = 1,
            initrd_addr_max: int = 0x7FFFFFFF) -> bytes:
    """A bzImage whose 64-bit entry (load address + 0x200) reports rsi (the zero page), the
    'HdrS' magic seen through it, cmd_line_ptr, ramdisk_image, e820 entry count; then ends."""
    setup_sects = 1
    setup = bytearray(512 * (setup_sects + 1))
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x6A                                 # header runs to 0x26B
    struct.pack_into("<I", setup, 0x202, 0x53726448)    # "HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01                                 # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x260, 0x10000)       # init_size

    def out64(load: bytes) -> bytes:
        return load + b"\x66\xba" + struct.pack("<H", REPORT_PORT) + b"\xef"

    code = out64(b"\x89\xf0")                           # mov eax, esi
    code += out64(b"\x8b\x86" + struct.pack("<I", 0x202))   # mov eax, [rsi+0x202]
    code += out64(b"\x8b\x86" + struct.pack("<I", 0x228))   # cmd_line_ptr
    code += out64(b"\x8b\x86" + struct.pack("<I", 0x218))   # ramdisk_image
    code += out64(b"\x0f\xb6\x86" + struct.pack("<I", 0x1E8))  # movzx eax, byte e820_entries
    code += ENDINGS_32[ending] + b"\xf4\xeb\xfd"
    pm = bytearray(0x200) + code
    return bytes(setup) + bytes(pm)


def spin_init_elf() -> bytes:
    """A static x86-64 ELF that spins (pause; jmp) and never makes a system call.

    As /sbin/init it proves the kernel mounted its root and exec'd a program from it, and it
    keeps the kernel alive where guest user space cannot make system calls."""
    base = 0x400000
    code = b"\xf3\x90\xeb\xfc"                      # 1: pause; jmp 1b
    ehdr_size, phdr_size = 64, 56
    entry = base + ehdr_size + phdr_size
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, ehdr_size, 0, 0, ehdr_size,
                        phdr_size, 1, 0, 0, 0)
    total = ehdr_size + phdr_size + len(code)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    return ehdr + phdr + code



CONSOLE_BANNER = b"vmrun console guest ready\r\n"
_LAPIC = 0xFEE00000
_TIMER_VECTOR, _SPURIOUS_VECTOR = 0x30, 0x3F


def _store32(addr: int, value: int) -> bytes:
    return b"\xc7\x05" + struct.pack("<II", addr, value)        # mov dword [addr], value


def console_pvh(tick_ns: int = 10_000_000, entry: int = 0x100000) -> bytes:
    """A PVH "kernel" that stays up and costs the host almost nothing: it prints
    :data:`CONSOLE_BANNER` on COM1, then sleeps in ``hlt``, woken every ``tick_ns`` by its
    LAPIC timer (periodic), and on each wake-up polls

    - COM1's receiver: every byte typed comes back with ASCII case swapped (``xor 0x20``:
      "ping" -> "PING"), so a test sees the guest answer, not a terminal's local echo;
    - PM1 status: once the ACPI power button is pressed (PWRBTN_STS) it powers off (S5), as
      an OS honouring the button does.

    (A busy-polling guest would burn a host CPU where KVM emulates guest kernel code.)"""
    idt_at, idtr_at, handler_at = entry + 0x400, entry + 0x7F0, entry + 0x800
    stack = entry + 0xFF0
    code = bytearray(b"\xbc" + struct.pack("<I", stack))               # mov esp, stack
    code += b"\x0f\x01\x1d" + struct.pack("<I", idtr_at)              # lidt [idtr]
    code += _store32(_LAPIC + 0xF0, 0x100 | _SPURIOUS_VECTOR)          # SVR: APIC on
    code += _store32(_LAPIC + 0x3E0, 0xB)                              # timer divide by 1
    code += _store32(_LAPIC + 0x320, 0x20000 | _TIMER_VECTOR)          # LVT timer: periodic
    code += _store32(_LAPIC + 0x380, tick_ns)                          # initial count
    code += b"\x66\xba" + struct.pack("<H", layout.COM1_PORT)          # mov dx, COM1
    for ch in CONSOLE_BANNER:
        code += b"\xb0" + bytes([ch]) + b"\xee"                        # mov al, ch; out dx, al
    top = len(code)
    code += b"\x66\xba" + struct.pack("<H", layout.PM1A_EVT_PORT)       # mov dx, PM1a_STS
    code += b"\x66\xed"                                                 # in ax, dx
    code += b"\x66\xa9\x00\x01"                                         # test ax, PWRBTN_STS
    jnz_at = len(code)
    code += b"\x0f\x85\0\0\0\0"                                         # jnz poweroff
    code += b"\x66\xba" + struct.pack("<H", layout.COM1_PORT + 5)       # mov dx, LSR
    code += b"\xec\xa8\x01"                                             # in al, dx; test al, 1
    jz_at = len(code)
    code += b"\x74\x00"                                                 # jz idle
    code += b"\x66\xba" + struct.pack("<H", layout.COM1_PORT)           # mov dx, RBR/THR
    code += b"\xec\x34\x20\xee"                                         # in; xor al,0x20; out
    code += b"\xe9" + struct.pack("<i", top - (len(code) + 5))          # jmp top
    code[jz_at + 1] = len(code) - (jz_at + 2)
    code += b"\xfb\xf4\xfa"                                             # idle: sti; hlt; cli
    code += b"\xe9" + struct.pack("<i", top - (len(code) + 5))          # jmp top
    struct.pack_into("<i", code, jnz_at + 2, len(code) - (jnz_at + 6))
    code += ENDINGS_32["poweroff"] + b"\xf4\xeb\xfd"                    # poweroff: S5
    assert len(code) < idt_at - entry
    image = bytearray(0x1000)
    image[:len(code)] = code
    gate = struct.pack("<HHBBH", handler_at & 0xFFFF, 0x10, 0, 0x8E, handler_at >> 16)
    for vector in (_TIMER_VECTOR, _SPURIOUS_VECTOR):
        off = idt_at - entry + 8 * vector
        image[off:off + 8] = gate
    struct.pack_into("<HI", image, idtr_at - entry, 8 * (_SPURIOUS_VECTOR + 1) - 1, idt_at)
    # The handler never returns (an emulated iret is what kvm-pvm cannot do): the timer only
    # fires in the idle hlt, so it acknowledges, drops the interrupt frame and polls again.
    handler = _store32(_LAPIC + 0xB0, 0) + b"\xbc" + struct.pack("<I", stack)  # EOI; mov esp
    handler += b"\xe9" + struct.pack("<i", (entry + top) - (handler_at + len(handler) + 5))
    image[handler_at - entry:handler_at - entry + len(handler)] = handler
    base = pvh_elf("poweroff", entry)
    # Same ELF layout as pvh_elf: code at file offset 0x1000, loaded at entry; new sizes.
    head = bytearray(base[:0x1000])
    struct.pack_into("<QQ", head, 64 + 32, len(image), len(image))    # p_filesz, p_memsz
    return bytes(head) + bytes(image)
