"""A small AML (ACPI Machine Language) encoder: enough for a DSDT a kernel parses quickly.

Each function returns the encoded bytes of one term; terms nest by concatenation. Names follow
the ACPI specification's grammar (section 20, "ACPI Machine Language Specification").
"""

from __future__ import annotations

import struct

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, \
    0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP, RETURN_OP = 0x08, 0x10, 0x11, 0x12, 0x14, \
    0xA4
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX, ROOT_CHAR, PARENT_CHAR = 0x2E, 0x2F, 0x5C, 0x5E


def name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") or \
            not all(c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def name_string(name: str) -> bytes:
    """``\\_SB.PCI0``, ``^FOO``, ``_HID`` ... -> NameString."""
    prefix = b""
    while name.startswith("\\") or name.startswith("^"):
        prefix += bytes([ROOT_CHAR if name[0] == "\\" else PARENT_CHAR])
        name = name[1:]
    segs = [s for s in name.split(".") if s] if name else []
    if not segs:
        return prefix + b"\x00"
    body = b"".join(name_seg(s) for s in segs)
    if len(segs) == 1:
        return prefix + body
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + body
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + body


def pkg_length(payload_len: int) -> bytes:
    """PkgLength for ``payload_len`` bytes that follow it (the encoding counts itself)."""
    if payload_len + 1 < 0x40:
        return bytes([payload_len + 1])
    for n in (2, 3, 4):
        total = payload_len + n
        if total < 1 << (4 + 8 * (n - 1)):
            out = [((n - 1) << 6) | (total & 0xF)]
            total >>= 4
            for _ in range(n - 1):
                out.append(total & 0xFF)
                total >>= 8
            return bytes(out)
    raise ValueError("AML package too large")


def integer(value: int) -> bytes:
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value < 0x100:
        return bytes([BYTE_PREFIX, value])
    if value < 0x10000:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value < 0x1_0000_0000:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def eisa_id(text: str) -> int:
    """EISAID("PNP0501") -> 0x0105D041: three letters, four hex digits, byte-swapped."""
    if len(text) != 7:
        raise ValueError(f"bad EISA id {text!r}")
    v = ((ord(text[0]) - 0x40) << 26) | ((ord(text[1]) - 0x40) << 21) | \
        ((ord(text[2]) - 0x40) << 16) | int(text[3:], 16)
    return int.from_bytes(v.to_bytes(4, "big"), "little")


def name(n: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(n) + value


def _pkg(op: bytes, body: bytes) -> bytes:
    return op + pkg_length(len(body)) + body


def scope(n: str, *terms: bytes) -> bytes:
    return _pkg(bytes([SCOPE_OP]), name_string(n) + b"".join(terms))


def device(n: str, *terms: bytes) -> bytes:
    return _pkg(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(n) + b"".join(terms))


def method(n: str, args: int, *terms: bytes, serialized: bool = False) -> bytes:
    flags = (args & 7) | (0x08 if serialized else 0)
    return _pkg(bytes([METHOD_OP]), name_string(n) + bytes([flags]) + b"".join(terms))


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


def package(*elements: bytes) -> bytes:
    return _pkg(bytes([PACKAGE_OP]), bytes([len(elements)]) + b"".join(elements))


def buffer(data: bytes) -> bytes:
    return _pkg(bytes([BUFFER_OP]), integer(len(data)) + data)


# -- resource descriptors (ACPI 6.4, 6.4) -------------------------------------------------
def resource_template(*descriptors: bytes) -> bytes:
    """A Buffer holding the descriptors and an End Tag (checksum 0: "ignore")."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


def io(base: int, length: int, alignment: int = 1) -> bytes:
    """IO(Decode16, base, base, alignment, length)"""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    mask = 0
    for irq in irqs:
        mask |= 1 << irq
    return struct.pack("<BH", 0x22, mask)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, length)


def _address_space(tag: int, fmt: str, rtype: int, type_flags: int, lo: int, hi: int) -> bytes:
    gran = 0
    body = struct.pack("<BBB", rtype, 0x0C, type_flags)   # producer, min/max fixed
    body += struct.pack("<" + fmt * 5, gran, lo, hi, 0, hi - lo + 1)
    return struct.pack("<BH", tag, len(body)) + body


def word_bus_number(lo: int, hi: int) -> bytes:
    return _address_space(0x88, "H", 2, 0, lo, hi)


def word_io(lo: int, hi: int) -> bytes:
    return _address_space(0x88, "H", 1, 0x03, lo, hi)


def dword_memory(lo: int, hi: int) -> bytes:
    return _address_space(0x87, "I", 0, 0x01, lo, hi)


def qword_memory(lo: int, hi: int) -> bytes:
    return _address_space(0x8A, "Q", 0, 0x01, lo, hi)
