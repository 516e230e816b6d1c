"""SMBIOS 3.0 tables: the entry point a kernel's scan finds, structure layout, and what
dmidecode decodes from them (UUID, processors, memory).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from vmrun.core import layout, smbios
from vmrun.core.smbios import build_smbios

DMIDECODE = shutil.which("dmidecode") or next(
    (p for p in ("/usr/sbin/dmidecode", "/sbin/dmidecode") if Path(p).exists()), None)
needs_dmidecode = pytest.mark.skipif(DMIDECODE is None, reason="dmidecode is not installed")

UUID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
GiB = layout.GiB

# Formatted-area lengths of the SMBIOS 3.0 layouts used.
LENGTHS = {0: 0x18, 1: 0x1B, 3: 0x16, 4: 0x30, 16: 0x17, 17: 0x28, 19: 0x1F, 32: 0x0B, 127: 4}


def parse(blob: bytes, base: int = layout.SMBIOS_BASE) -> list[tuple[int, int, bytes, list[str]]]:
    """(type, handle, formatted area, strings) of each structure, via the entry point."""
    entry = blob[:24]
    table_len, table_addr = struct.unpack_from("<IQ", entry, 12)
    table = blob[table_addr - base:table_addr - base + table_len]
    assert len(table) == table_len
    out, off = [], 0
    while off < len(table):
        stype, length, handle = struct.unpack_from("<BBH", table, off)
        formatted = table[off:off + length]
        end = table.index(b"\0\0", off + length)
        strings = [s.decode() for s in table[off + length:end].split(b"\0") if s]
        out.append((stype, handle, formatted, strings))
        off = end + 2
        if stype == 127:
            break
    assert off == len(table)
    return out


def string_at(formatted: bytes, offset: int, strings: list[str]) -> str | None:
    index = formatted[offset]
    return strings[index - 1] if index else None


def test_entry_point() -> None:
    blob = build_smbios(UUID, 2, 1 * GiB)
    entry = blob[:24]
    assert entry[:5] == b"_SM3_"
    assert sum(entry) % 256 == 0
    assert entry[6] == 0x18 and tuple(entry[7:10]) == (3, 0, 0) and entry[10] == 1
    table_len, table_addr = struct.unpack_from("<IQ", entry, 12)
    assert table_addr == layout.SMBIOS_BASE + 32 and table_addr % 16 == 0
    assert len(blob) == 32 + table_len


def test_kernel_style_scan_finds_it() -> None:
    """Linux (no EFI) scans 0xF0000-0xFFFFF on 16-byte boundaries for a valid _SM3_."""
    blob = build_smbios(UUID, 2, 1 * GiB)
    area = bytearray(0x10000)
    start = layout.SMBIOS_BASE - 0xF0000
    area[start:start + len(blob)] = blob
    found = [0xF0000 + off for off in range(0, len(area), 16)
             if area[off:off + 5] == b"_SM3_" and 24 <= area[off + 6] <= 32
             and sum(area[off:off + area[off + 6]]) % 256 == 0]
    assert found == [layout.SMBIOS_BASE]


def test_structures() -> None:
    structs = parse(build_smbios(UUID, 3, 2 * GiB))
    types = [s[0] for s in structs]
    assert types == [0, 1, 3, 4, 4, 4, 16, 17, 19, 32, 127]
    assert len({s[1] for s in structs}) == len(structs)           # unique handles
    for stype, _, formatted, _ in structs:
        assert len(formatted) == LENGTHS[stype], stype
        assert formatted[1] == LENGTHS[stype]


def test_system_uuid_is_little_endian_in_its_first_fields() -> None:
    (_, _, formatted, strings), = [s for s in parse(build_smbios(UUID, 1, GiB)) if s[0] == 1]
    assert formatted[8:24] == bytes.fromhex("33221100 5544 7766 8899 aabbccddeeff")
    assert string_at(formatted, 5, strings) == "vmrun"
    assert string_at(formatted, 7, strings) == str(UUID)


def test_product_name() -> None:
    (_, _, formatted, strings), = [s for s in parse(build_smbios(UUID, 1, GiB, product="box"))
                                   if s[0] == 1]
    assert string_at(formatted, 5, strings) == "box"


def test_processors() -> None:
    cpus = [s for s in parse(build_smbios(UUID, 4, GiB)) if s[0] == 4]
    assert [string_at(f, 4, strs) for _, _, f, strs in cpus] == [f"CPU {i}" for i in range(4)]
    for _, _, formatted, _ in cpus:
        assert formatted[0x18] == 0x41                            # populated, enabled
        assert formatted[0x23:0x26] == b"\x01\x01\x01"


@pytest.mark.parametrize("memory, ranges", [
    (512 << 20, [(0, (512 << 20 >> 10) - 1)]),
    (3 * GiB, [(0, (3 * GiB >> 10) - 1)]),
    (6 * GiB, [(0, (3 * GiB >> 10) - 1), (4 * GiB >> 10, (7 * GiB >> 10) - 1)]),
])
def test_memory(memory: int, ranges: list[tuple[int, int]]) -> None:
    structs = parse(build_smbios(UUID, 1, memory))
    (_, array_handle, array, _), = [s for s in structs if s[0] == 16]
    assert struct.unpack_from("<I", array, 7)[0] == memory >> 10
    (_, _, device, _), = [s for s in structs if s[0] == 17]
    assert struct.unpack_from("<HHHHH", device, 4)[0] == array_handle
    assert struct.unpack_from("<H", device, 0x0C)[0] == memory >> 20
    mapped = [struct.unpack_from("<IIH", f, 4) for t, _, f, _ in structs if t == 19]
    assert mapped == [(start, end, array_handle) for start, end in ranges]


def test_large_memory_uses_extended_fields() -> None:
    memory = 5 << 40                                              # 5 TiB
    structs = parse(build_smbios(UUID, 1, memory))
    (_, _, array, _), = [s for s in structs if s[0] == 16]
    assert struct.unpack_from("<IHHQ", array, 7) == (0x80000000, 0xFFFE, 1, memory)
    (_, _, device, _), = [s for s in structs if s[0] == 17]
    assert struct.unpack_from("<H", device, 0x0C)[0] == 0x7FFF
    assert struct.unpack_from("<I", device, 0x1C)[0] == memory >> 20
    high = [f for t, _, f, _ in structs if t == 19][1]
    assert struct.unpack_from("<IIHBQQ", high, 4)[:2] == (0xFFFFFFFF, 0xFFFFFFFF)
    assert struct.unpack_from("<QQ", high, 0x0F) == (
        4 * GiB, 4 * GiB + memory - 3 * GiB - 1)


def test_fits_below_1mib() -> None:
    blob = build_smbios(UUID, 254, 1 << 40)
    assert layout.SMBIOS_BASE + len(blob) <= 0x100000
    with pytest.raises(ValueError):
        build_smbios(UUID, 1, GiB, base=0xF0008)
    with pytest.raises(ValueError):
        build_smbios(UUID, 0, GiB)


def dump_file(tmp_path: Path, blob: bytes) -> Path:
    """The layout of ``dmidecode --dump-bin``: the entry point at offset 0, pointing at the
    table by its file offset (32) instead of its guest-physical address.
    """
    table = blob[smbios.TABLE_OFFSET:]
    entry = smbios.entry_point(len(table), smbios.TABLE_OFFSET)
    path = tmp_path / "smbios.bin"
    path.write_bytes(entry + blob[len(entry):])
    return path


def dmidecode(path: Path, *args: str) -> str:
    out = subprocess.run([str(DMIDECODE), "--from-dump", str(path), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


@needs_dmidecode
def test_dmidecode_decodes_it(tmp_path: Path) -> None:
    blob = build_smbios(UUID, 3, 6 * GiB, product="testbox")
    path = dump_file(tmp_path, blob)
    full = dmidecode(path)
    assert "SMBIOS 3.0.0 present." in full
    for bad in ("OUT OF SPEC", "Invalid", "wrong", "Bad checksum", "Unknown Type"):
        assert bad not in full, full
    assert "System is a virtual machine" in full and "End Of Table" in full
    assert dmidecode(path, "-s", "system-uuid").strip() == str(UUID)
    assert dmidecode(path, "-s", "system-product-name").strip() == "testbox"
    assert dmidecode(path, "-t", "processor").count("Processor Information") == 3
    memory = dmidecode(path, "-t", "memory")
    assert "Maximum Capacity: 6 GB" in memory and "Size: 6 GB" in memory
    mapped = dmidecode(path, "-t", "19")
    assert mapped.count("Range Size: 3 GB") == 2
    assert "Starting Address: 0x00100000000" in mapped
