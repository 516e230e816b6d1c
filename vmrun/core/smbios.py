"""SMBIOS 3.0 tables with the machine's UUID (so a guest can tell which machine it is).

A 64-bit entry point ("_SM3_") at the start of the area, which kernels find by scanning
0xF0000-0xFFFFF on 16-byte boundaries, followed by the structure table: types 0, 1, 3, 4 (one
per vCPU), 16, 17, 19, 32 and 127.
"""

from __future__ import annotations

import struct
import uuid as uuidlib

from vmrun.core import layout

VENDOR = "vmrun"


def _structure(stype: int, handle: int, formatted: bytes, strings: list[str]) -> bytes:
    head = struct.pack("<BBH", stype, 4 + len(formatted), handle) + formatted
    if not strings:
        return head + b"\0\0"
    return head + b"".join(s.encode() + b"\0" for s in strings) + b"\0"


def build_smbios(uuid: uuidlib.UUID, ncpus: int, memory_bytes: int,
                 base: int = layout.SMBIOS_BASE, product: str = "vmrun") -> bytes:
    structs = []
    h = 0
    # Type 0: BIOS information (characteristics not supported; byte 2 bit 4: virtual machine)
    structs.append(_structure(0, h, struct.pack("<BBHBBQBBBBBB", 1, 2, 0xE800, 3, 0, 1 << 3,
                                                0, 1 << 4, 0, 1, 0xFF, 0xFF),
                              [VENDOR, "1.0", "11/21/2026"]))
    h += 1
    # Type 1: system information; UUID with its first three fields little-endian (2.6+)
    structs.append(_structure(1, h, struct.pack("<BBBB16sBBB", 1, 2, 3, 4, uuid.bytes_le, 6,
                                                5, 6),
                              [VENDOR, product, "1.0", str(uuid), "vmrun", "vmrun"]))
    h += 1
    # Type 3: chassis ("other", safe states, no security)
    structs.append(_structure(3, h, struct.pack("<BBBBBBBBB", 1, 1, 0, 0, 0, 3, 3, 3, 2),
                              [VENDOR]))
    h += 1
    for cpu in range(ncpus):
        structs.append(_structure(4, h, struct.pack(
            "<BBBBQBBHHHBBHHHBBBBBBHH", 1, 3, 0xFE, 2, 0, 0, 0, 0, 2000, 2000, 0x41, 1,
            0xFFFF, 0xFFFF, 0xFFFF, 0, 0, 0, 1, 1, 1, 0x04, 0x01),
            [f"CPU {cpu}", VENDOR]))
        h += 1
    array_handle = h
    kib = memory_bytes >> 10
    structs.append(_structure(16, h, struct.pack("<BBBIHHQ", 3, 3, 3,
                                                 min(kib, 0x80000000 - 1) if kib < 0x80000000
                                                 else 0x80000000, 0xFFFE, 1,
                                                 kib if kib >= 0x80000000 else 0), []))
    h += 1
    mib = memory_bytes >> 20
    size_field = mib if mib < 0x7FFF else 0x7FFF
    structs.append(_structure(17, h, struct.pack("<HHHHHBBBBBHHBBBBBIH", array_handle, 0xFFFE,
                                                 64, 64, size_field, 9, 0, 1, 0, 7, 2, 0,
                                                 2, 0, 0, 0, 0,
                                                 mib if size_field == 0x7FFF else 0, 0),
                              ["DIMM 0", VENDOR]))
    h += 1
    end_kib = kib - 1
    structs.append(_structure(19, h, struct.pack("<IIHBQQ",
                                                 0 if end_kib < 0xFFFFFFFF else 0xFFFFFFFF,
                                                 min(end_kib, 0xFFFFFFFF), array_handle, 1,
                                                 0, memory_bytes - 1 if end_kib >= 0xFFFFFFFF
                                                 else 0), []))
    h += 1
    structs.append(_structure(32, h, bytes(6) + b"\0", []))
    h += 1
    structs.append(_structure(127, h, b"", []))
    table = b"".join(structs)
    table_addr = base + 32
    entry = bytearray(struct.pack("<5sBBBBBBBIQ", b"_SM3_", 0, 0x18, 3, 0, 0, 1, 0, len(table),
                                  table_addr))
    entry[5] = (-sum(entry)) & 0xFF
    blob = bytes(entry) + bytes(32 - len(entry)) + table
    if base + len(blob) > 0x100000:
        raise ValueError("SMBIOS tables do not fit below 1 MiB")
    return blob
