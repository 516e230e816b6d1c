"""A small AML (ACPI Machine Language) encoder: the terms a DSDT of a virtual machine needs.

Why an encoder and not ASL source compiled at build time: the DSDT depends on the machine file
(serial ports, PCI devices, plugins), so it is built at start-up, in Python, without needing
``iasl`` on the host. Every function returns the encoded bytes of one term; terms nest by
concatenation, so a device is simply::

    device("COM1",
           name("_HID", integer(eisa_id("PNP0501"))),
           name("_CRS", resource_template(io(0x3F8, 8), irq_no_flags(4))))

Function and argument names follow the ACPI specification (6.4): chapter 20 "ACPI Machine
Language (AML) Specification" for the terms and section 6.4 "Resource Data Types for ACPI" for
the resource descriptors. Only encodings are produced here; nothing is evaluated.
"""

from __future__ import annotations

import struct

# --- opcodes (ACPI 6.4, 20.3 "AML Byte Stream Byte Values") ------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
VAR_PACKAGE_OP = 0x13
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
ROOT_CHAR = 0x5C            # '\'
PARENT_PREFIX_CHAR = 0x5E   # '^'
LOCAL0_OP = 0x60
ARG0_OP = 0x68
DEVICE_OP = 0x82            # after EXT_OP_PREFIX
NOTIFY_OP = 0x86
RETURN_OP = 0xA4
ONES_OP = 0xFF

ZERO = bytes([ZERO_OP])
ONE = bytes([ONE_OP])
ONES = bytes([ONES_OP])     # all ones: 64 bits in a revision-2 DSDT, 32 bits in revision 1

PKG_LENGTH_MAX = (1 << 28) - 1

# _STA bits (ACPI 6.4, 6.3.7): present, enabled, shown in UI, functioning.
STA_PRESENT_ENABLED = 0x0F


# --- names (20.2.2 "Name Objects Encoding") -------------------------------------------------
def name_seg(seg: str) -> bytes:
    """One NameSeg: a lead character A-Z or '_', up to three more of A-Z, 0-9, '_'.

    Shorter names are padded with '_' as ASL does, so ``"RTC"`` is ``RTC_``.
    """
    ok = 1 <= len(seg) <= 4 and (seg[0].isascii() and (seg[0].isupper() or seg[0] == "_"))
    ok = ok and all(c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in seg)
    if not ok:
        raise ValueError(f"bad ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: ``\\_SB.PCI0`` (from the root), ``^^FOO`` (from the parents), ``_HID``.

    One segment is a bare NameSeg, two take DualNamePrefix, more take MultiNamePrefix and a
    count; an empty path after the prefix is the NullName (a lone ``\\`` is the root itself).
    """
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix += bytes([PARENT_PREFIX_CHAR])
            rest = rest[1:]
    segs = rest.split(".") if rest else []
    body = b"".join(name_seg(s) for s in segs)
    if not segs:
        return prefix + b"\x00"                       # NullName
    if len(segs) == 1:
        return prefix + body
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + body
    if len(segs) > 255:
        raise ValueError("ACPI name path has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + body


# --- PkgLength (20.2.4 "Package Length Encoding") ------------------------------------------
def encode_pkg_length(value: int) -> bytes:
    """The PkgLength field holding ``value`` exactly, in as few bytes as it fits.

    One byte holds 0..63 in bits 0-5; otherwise bits 6-7 of the lead byte count the bytes that
    follow (1-3), its bits 0-3 hold the low nibble and the following bytes the rest.
    """
    if not 0 <= value <= PKG_LENGTH_MAX:
        raise ValueError(f"PkgLength {value} out of range")
    if value < 0x40:
        return bytes([value])
    follow = 1 if value < 1 << 12 else 2 if value < 1 << 20 else 3
    out = [(follow << 6) | (value & 0x0F)]
    rest = value >> 4
    for _ in range(follow):
        out.append(rest & 0xFF)
        rest >>= 8
    return bytes(out)


def pkg_length(payload_len: int) -> bytes:
    """The PkgLength preceding ``payload_len`` bytes: the value counts its own bytes too."""
    for size, limit in ((1, 1 << 6), (2, 1 << 12), (3, 1 << 20), (4, 1 << 28)):
        if payload_len + size < limit:
            return encode_pkg_length(payload_len + size)
    raise ValueError(f"AML package of {payload_len} bytes is too large")


def _with_pkg_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


# --- data objects (20.2.3 "Data Objects Encoding") -----------------------------------------
def byte_const(value: int) -> bytes:
    """BytePrefix ByteData."""
    return bytes([BYTE_PREFIX]) + struct.pack("<B", value)


def word_const(value: int) -> bytes:
    """WordPrefix WordData."""
    return bytes([WORD_PREFIX]) + struct.pack("<H", value)


def dword_const(value: int) -> bytes:
    """DWordPrefix DWordData."""
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def qword_const(value: int) -> bytes:
    """QWordPrefix QWordData (needs a revision-2 DSDT to keep more than 32 bits)."""
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned integer: Zero, One, or a Byte/Word/DWord/QWord const.

    Ones is never chosen, because its width depends on the table revision; use :data:`ONES`.
    """
    if not 0 <= value < 1 << 64:
        raise ValueError(f"AML integer {value} out of range")
    if value == 0:
        return ZERO
    if value == 1:
        return ONE
    if value < 1 << 8:
        return byte_const(value)
    if value < 1 << 16:
        return word_const(value)
    if value < 1 << 32:
        return dword_const(value)
    return qword_const(value)


def string(text: str) -> bytes:
    """StringPrefix AsciiCharList NullChar (ASCII 0x01-0x7F only)."""
    data = text.encode("ascii")
    if b"\x00" in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + data + b"\x00"


def eisa_id(text: str) -> int:
    """EISAID("PNP0501") -> 0x0105D041, the compressed 32-bit form of a PNP id.

    Three upper-case letters of 5 bits each ('A' = 1) and four hex digits make a big-endian
    dword; AML stores it as an integer, i.e. little-endian, hence the byte swap.
    """
    letters, digits = text[:3], text[3:]
    if len(text) != 7 or not all("A" <= c <= "Z" for c in letters) or \
            not all(c in "0123456789ABCDEF" for c in digits):
        raise ValueError(f"bad EISA id {text!r}")
    value = 0
    for c in letters:
        value = (value << 5) | (ord(c) - 0x40)
    value = (value << 16) | int(digits, 16)
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def arg(n: int) -> bytes:
    """ArgN (Arg0..Arg6): a method's argument, as a term."""
    if not 0 <= n <= 6:
        raise ValueError(f"no Arg{n}")
    return bytes([ARG0_OP + n])


def local(n: int) -> bytes:
    """LocalN (Local0..Local7): a method's local variable, as a term."""
    if not 0 <= n <= 7:
        raise ValueError(f"no Local{n}")
    return bytes([LOCAL0_OP + n])


# --- named objects and their containers ----------------------------------------------------
def name(path: str, value: bytes) -> bytes:
    """Name(path, value): DefName := NameOp NameString DataRefObject."""
    return bytes([NAME_OP]) + name_string(path) + value


def package(*elements: bytes) -> bytes:
    """Package(){elements}: PackageOp PkgLength NumElements PackageElementList.

    More than 255 elements do not fit NumElements; those become a VarPackage, whose count is
    an integer term.
    """
    body = b"".join(elements)
    if len(elements) <= 255:
        return _with_pkg_length(bytes([PACKAGE_OP]), bytes([len(elements)]) + body)
    return _with_pkg_length(bytes([VAR_PACKAGE_OP]), integer(len(elements)) + body)


def buffer(data: bytes) -> bytes:
    """Buffer(){data}: BufferOp PkgLength BufferSize ByteList."""
    return _with_pkg_length(bytes([BUFFER_OP]), integer(len(data)) + data)


def scope(path: str, *terms: bytes) -> bytes:
    """Scope(path){terms}: open an existing namespace node (``\\_SB``) to add objects to it."""
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """Device(path){terms}: ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]),
                            name_string(path) + b"".join(terms))


def method(path: str, args: int, *terms: bytes, serialized: bool = False,
           sync_level: int = 0) -> bytes:
    """Method(path, args, Serialized|NotSerialized, sync_level){terms}.

    MethodFlags: bits 0-2 the argument count, bit 3 Serialized (one thread at a time, which a
    method creating named objects needs), bits 4-7 the SyncLevel.
    """
    if not 0 <= args <= 7 or not 0 <= sync_level <= 15:
        raise ValueError("method takes 0-7 arguments and sync level 0-15")
    flags = args | (0x08 if serialized else 0) | (sync_level << 4)
    return _with_pkg_length(bytes([METHOD_OP]),
                            name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: bytes) -> bytes:
    """Return(value): ReturnOp ArgObject."""
    return bytes([RETURN_OP]) + value


def notify(target: str, value: bytes) -> bytes:
    """Notify(target, value): tell the OS about an event on a device (0x80 status change...)."""
    return bytes([NOTIFY_OP]) + name_string(target) + value


# --- resource descriptors (ACPI 6.4, 6.4 "Resource Data Types for ACPI") -------------------
# Small items: one tag byte (item name << 3 | length). Large items: 0x80 | item name, then a
# 16-bit length of what follows.
SMALL_IRQ = 0x04
SMALL_IO = 0x08
SMALL_END_TAG = 0x0F
LARGE_MEMORY32_FIXED = 0x86
LARGE_DWORD_ADDRESS = 0x87
LARGE_WORD_ADDRESS = 0x88
LARGE_EXTENDED_INTERRUPT = 0x89
LARGE_QWORD_ADDRESS = 0x8A

# Address space resource types (_RT) and flags.
RESOURCE_MEMORY, RESOURCE_IO, RESOURCE_BUS_NUMBER = 0, 1, 2
CONSUMER = 1 << 0           # general flags: consumes only (clear: produces, e.g. a bridge)
SUB_DECODE = 1 << 1         # subtractive decode (clear: positive)
MIN_FIXED = 1 << 2
MAX_FIXED = 1 << 3
IO_ENTIRE_RANGE = 0x03      # I/O type-specific flags: ISA and non-ISA ranges
MEM_READ_WRITE = 1 << 0     # memory type-specific flags: writable, then _MEM in bits 1-2
MEM_NON_CACHEABLE, MEM_CACHEABLE, MEM_WRITE_COMBINING, MEM_PREFETCHABLE = 0, 1, 2, 3


def _small(item: int, data: bytes) -> bytes:
    return bytes([(item << 3) | len(data)]) + data


def _large(tag: int, data: bytes) -> bytes:
    return struct.pack("<BH", tag, len(data)) + data


def end_tag(descriptors: bytes = b"", checksum: bool = False) -> bytes:
    """The End Tag closing a resource template of ``descriptors``.

    Its second byte is a checksum over the whole template, tag included. Zero means "treat as
    valid" (6.4.2.9), and zero is what iasl emits and what ACPICA writes back when it converts
    a template, so it is the default; ``checksum=True`` computes the real one.
    """
    tag = (SMALL_END_TAG << 3) | 1
    return bytes([tag, (-(sum(descriptors) + tag)) & 0xFF if checksum else 0])


def resource_template(*descriptors: bytes, checksum: bool = False) -> bytes:
    """ResourceTemplate(){descriptors}: a Buffer holding them and an End Tag."""
    data = b"".join(descriptors)
    return buffer(data + end_tag(data, checksum))


def io(base: int, length: int, alignment: int = 1, decode16: bool = True) -> bytes:
    """IO(Decode16, base, base, alignment, length): a fixed port range of a legacy device."""
    return _small(SMALL_IO, struct.pack("<BHHBB", int(decode16), base, base, alignment, length))


def _irq_mask(irqs: tuple[int, ...]) -> int:
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"ISA IRQ {irq} out of range 0-15")
        mask |= 1 << irq
    return mask


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags(){irqs}: ISA IRQs, implied edge-triggered, active high, exclusive."""
    return _small(SMALL_IRQ, struct.pack("<H", _irq_mask(irqs)))


def irq(*irqs: int, edge: bool = True, active_low: bool = False, shared: bool = False,
        wake: bool = False) -> bytes:
    """IRQ(Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared){irqs}: ISA IRQs with flags."""
    info = int(edge) | (int(active_low) << 3) | (int(shared) << 4) | (int(wake) << 5)
    return _small(SMALL_IRQ, struct.pack("<HB", _irq_mask(irqs), info))


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite|ReadOnly, base, length): e.g. an MMIO register block."""
    return _large(LARGE_MEMORY32_FIXED, struct.pack("<BII", int(writable), base, length))


def _address_space(tag: int, fmt: str, rtype: int, type_flags: int, lo: int, hi: int,
                   producer: bool) -> bytes:
    """The Word/DWord/QWord Address Space Descriptor of a fixed range ``lo``..``hi``.

    Min and max fixed, positive decode, granularity 0, no translation and
    ``_LEN = hi - lo + 1``: what a fixed window (as a PCI root decodes) needs, and a
    combination iasl accepts.
    """
    if hi < lo:
        raise ValueError(f"address range {lo:#x}..{hi:#x} is empty")
    general = MIN_FIXED | MAX_FIXED | (0 if producer else CONSUMER)
    data = struct.pack("<BBB", rtype, general, type_flags)
    data += struct.pack("<" + fmt * 5, 0, lo, hi, 0, hi - lo + 1)
    return _large(tag, data)


def word_bus_number(lo: int, hi: int, producer: bool = True) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, lo, hi, 0, len)."""
    return _address_space(LARGE_WORD_ADDRESS, "H", RESOURCE_BUS_NUMBER, 0, lo, hi, producer)


def word_io(lo: int, hi: int, producer: bool = True) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...): a port window."""
    return _address_space(LARGE_WORD_ADDRESS, "H", RESOURCE_IO, IO_ENTIRE_RANGE, lo, hi,
                          producer)


def dword_io(lo: int, hi: int, producer: bool = True) -> bytes:
    """DWordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _address_space(LARGE_DWORD_ADDRESS, "I", RESOURCE_IO, IO_ENTIRE_RANGE, lo, hi,
                          producer)


def _mem_flags(cache: int, writable: bool) -> int:
    if cache not in (MEM_NON_CACHEABLE, MEM_CACHEABLE, MEM_WRITE_COMBINING, MEM_PREFETCHABLE):
        raise ValueError(f"bad memory cacheability {cache}")
    return (MEM_READ_WRITE if writable else 0) | (cache << 1)


def dword_memory(lo: int, hi: int, cache: int = MEM_NON_CACHEABLE, writable: bool = True,
                 producer: bool = True) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, cache, ReadWrite, ...)."""
    return _address_space(LARGE_DWORD_ADDRESS, "I", RESOURCE_MEMORY,
                          _mem_flags(cache, writable), lo, hi, producer)


def qword_memory(lo: int, hi: int, cache: int = MEM_NON_CACHEABLE, writable: bool = True,
                 producer: bool = True) -> bytes:
    """QWordMemory(...): a window above 4 GiB (64-bit PCI BARs)."""
    return _address_space(LARGE_QWORD_ADDRESS, "Q", RESOURCE_MEMORY,
                          _mem_flags(cache, writable), lo, hi, producer)


def interrupt(*gsis: int, edge: bool = False, active_low: bool = False, shared: bool = False,
              wake: bool = False, producer: bool = False) -> bytes:
    """Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared){gsis}.

    The Extended Interrupt Descriptor: GSIs beyond the ISA range (IOAPIC pins 16-23 of PCI).
    """
    if not 1 <= len(gsis) <= 255:
        raise ValueError("Interrupt() takes 1-255 interrupt numbers")
    flags = (0 if producer else CONSUMER) | (int(edge) << 1) | (int(active_low) << 2) | \
        (int(shared) << 3) | (int(wake) << 4)
    return _large(LARGE_EXTENDED_INTERRUPT,
                  struct.pack(f"<BB{len(gsis)}I", flags, len(gsis), *gsis))
