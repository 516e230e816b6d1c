"""SMBIOS 3.0 tables: the machine's UUID, vCPUs and memory, as dmidecode and the guest see them.

Why: a guest identifies its machine by the SMBIOS system UUID (cloud-init, systemd's
machine id on first boot, licence checks), and ``dmidecode`` / ``/sys/class/dmi`` expect at
least the BIOS, system, chassis, processor and memory structures.

Layout: the 64-bit entry point ("_SM3_", 24 bytes) at ``base``, 16-aligned because a kernel
booted without EFI finds it by scanning 0xF0000-0xFFFFF on 16-byte boundaries, then the
structure table at ``base + 32``: types 0, 1, 3, 4 (one per vCPU), 16, 17, 19 (one per RAM
range), 32 and 127. Field offsets follow DMTF DSP0134 (SMBIOS Reference Specification) 3.0.0.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from collections.abc import Callable

from vmrun.core import layout

SMBIOS_MAJOR, SMBIOS_MINOR, SMBIOS_DOCREV = 3, 0, 0
ENTRY_POINT_LEN = 0x18
ENTRY_POINT_REVISION = 1
TABLE_OFFSET = 32           # the structure table follows the entry point, 16-aligned
SMBIOS_AREA_END = 0x100000  # the scanned area ends at 1 MiB

VENDOR = "vmrun"
BIOS_VERSION = "1.0"
BIOS_RELEASE_DATE = "01/01/2024"   # mm/dd/yyyy, as the spec requires
NO_HANDLE = 0xFFFF                 # e.g. no cache information
NO_ERROR_INFO = 0xFFFE             # memory error information not provided

# Structure types.
BIOS_INFORMATION = 0
SYSTEM_INFORMATION = 1
SYSTEM_ENCLOSURE = 3
PROCESSOR_INFORMATION = 4
PHYSICAL_MEMORY_ARRAY = 16
MEMORY_DEVICE = 17
MEMORY_ARRAY_MAPPED_ADDRESS = 19
SYSTEM_BOOT_INFORMATION = 32
END_OF_TABLE = 127

BIOS_CHARACTERISTICS_NOT_SUPPORTED = 1 << 3
BIOS_EXT2_VIRTUAL_MACHINE = 1 << 4      # characteristics extension byte 2, bit 4
WAKEUP_POWER_SWITCH = 0x06
CHASSIS_OTHER = 0x01
STATE_SAFE = 0x03
SECURITY_NONE = 0x03
CENTRAL_PROCESSOR = 0x03
FAMILY_OTHER = 0x01
CPU_POPULATED_ENABLED = 0x41            # socket populated, CPU enabled
UPGRADE_OTHER = 0x01
CPU_64BIT_CAPABLE = 1 << 2
LOCATION_OTHER = 0x01
USE_SYSTEM_MEMORY = 0x03
ECC_NONE = 0x03
FORM_FACTOR_DIMM = 0x09
MEMORY_TYPE_RAM = 0x07
TYPE_DETAIL_OTHER = 1 << 1
MAX_CAPACITY_EXTENDED = 0x80000000      # type 16: "see Extended Maximum Capacity"
SIZE_EXTENDED = 0x7FFF                  # type 17: "see Extended Size"
ADDRESS_EXTENDED = 0xFFFFFFFF           # type 19: "see Extended Starting/Ending Address"


def structure(stype: int, handle: int, formatted: bytes, strings: list[str]) -> bytes:
    """One structure: header, formatted area, then its strings (each NUL-ended) and a NUL.

    String fields in ``formatted`` refer to ``strings`` by 1-based index; 0 means none. A
    structure without strings still ends in two NULs.
    """
    head = struct.pack("<BBH", stype, 4 + len(formatted), handle) + formatted
    if any(not s or "\0" in s for s in strings):
        raise ValueError("SMBIOS strings must be non-empty and NUL-free")
    if not strings:
        return head + b"\0\0"
    return head + b"".join(s.encode("ascii", "replace") + b"\0" for s in strings) + b"\0"


def bios_information(handle: int) -> bytes:
    """Type 0 (2.4+ layout, 0x18 bytes): no characteristics, flagged as a virtual machine."""
    formatted = struct.pack("<BBHBBQBBBBBB",
                            1, 2,                   # vendor, BIOS version
                            0xE800,                 # starting address segment
                            3,                      # release date
                            0,                      # ROM size: 64 KiB
                            BIOS_CHARACTERISTICS_NOT_SUPPORTED,
                            0, BIOS_EXT2_VIRTUAL_MACHINE,
                            1, 0,                   # system BIOS release 1.0
                            0xFF, 0xFF)             # no embedded controller
    return structure(BIOS_INFORMATION, handle, formatted,
                     [VENDOR, BIOS_VERSION, BIOS_RELEASE_DATE])


def system_information(handle: int, uuid: uuidlib.UUID, product: str) -> bytes:
    """Type 1 (2.4+ layout, 0x1B bytes). Since SMBIOS 2.6 the UUID's first three fields are
    little-endian, which is exactly Python's ``UUID.bytes_le``.
    """
    formatted = struct.pack("<BBBB16sBBB",
                            1, 2, 3, 4,             # manufacturer, product, version, serial
                            uuid.bytes_le,
                            WAKEUP_POWER_SWITCH,
                            5, 6)                   # SKU, family
    return structure(SYSTEM_INFORMATION, handle, formatted,
                     [VENDOR, product, "1.0", str(uuid), product, "Virtual Machine"])


def system_enclosure(handle: int) -> bytes:
    """Type 3 (2.7+ layout, 0x16 bytes with no contained elements): chassis type "Other"."""
    formatted = struct.pack("<BBBBBBBBBIBBBBB",
                            1,                      # manufacturer
                            CHASSIS_OTHER,
                            0, 0, 0,                # version, serial, asset tag: none
                            STATE_SAFE, STATE_SAFE, STATE_SAFE,   # boot-up, power, thermal
                            SECURITY_NONE,
                            0,                      # OEM-defined
                            0, 0,                   # height unspecified, power cords unknown
                            0, 0,                   # no contained elements
                            0)                      # SKU: none
    return structure(SYSTEM_ENCLOSURE, handle, formatted, [VENDOR])


def processor_information(handle: int, cpu: int) -> bytes:
    """Type 4 (3.0 layout, 0x30 bytes): one single-core, single-thread socket per vCPU.

    Speeds and the processor id are 0 (unknown): the host CPU model is not promised.
    """
    formatted = struct.pack("<BBBBQBBHHHBBHHHBBBBBBHHHHH",
                            1,                      # socket designation
                            CENTRAL_PROCESSOR, FAMILY_OTHER,
                            2,                      # manufacturer
                            0,                      # processor id
                            3,                      # version
                            0,                      # voltage
                            0, 0, 0,                # external clock, max and current speed
                            CPU_POPULATED_ENABLED, UPGRADE_OTHER,
                            NO_HANDLE, NO_HANDLE, NO_HANDLE,   # L1, L2, L3 caches
                            0, 0, 0,                # serial, asset tag, part number
                            1, 1, 1,                # cores, cores enabled, threads
                            CPU_64BIT_CAPABLE,
                            FAMILY_OTHER,           # processor family 2
                            1, 1, 1)                # core count 2, enabled 2, thread count 2
    return structure(PROCESSOR_INFORMATION, handle, formatted,
                     [f"CPU {cpu}", VENDOR, "vmrun virtual CPU"])


def physical_memory_array(handle: int, memory_bytes: int) -> bytes:
    """Type 16 (2.7+ layout, 0x17 bytes): one array holding all RAM, in one device."""
    kib = memory_bytes >> 10
    capacity = kib if kib < MAX_CAPACITY_EXTENDED else MAX_CAPACITY_EXTENDED
    extended = memory_bytes if capacity == MAX_CAPACITY_EXTENDED else 0   # in bytes
    formatted = struct.pack("<BBBIHHQ", LOCATION_OTHER, USE_SYSTEM_MEMORY, ECC_NONE, capacity,
                            NO_ERROR_INFO, 1, extended)
    return structure(PHYSICAL_MEMORY_ARRAY, handle, formatted, [])


def memory_device(handle: int, array_handle: int, memory_bytes: int) -> bytes:
    """Type 17 (3.0 layout, 0x28 bytes): one DIMM of the whole size, in MiB."""
    mib = memory_bytes >> 20
    size = mib if mib < SIZE_EXTENDED else SIZE_EXTENDED
    extended = mib if size == SIZE_EXTENDED else 0
    formatted = struct.pack("<HHHHHBBBBBHHBBBBBIHHHH",
                            array_handle, NO_ERROR_INFO,
                            0xFFFF, 0xFFFF,         # total and data width: unknown
                            size, FORM_FACTOR_DIMM,
                            0,                      # not part of a set
                            1, 0,                   # device locator, no bank locator
                            MEMORY_TYPE_RAM, TYPE_DETAIL_OTHER,
                            0,                      # speed unknown
                            2, 0, 0, 0,             # manufacturer; no serial, tag, part
                            0,                      # rank unknown
                            extended,
                            0,                      # configured speed unknown
                            0, 0, 0)                # voltages unknown
    return structure(MEMORY_DEVICE, handle, formatted, ["DIMM 0", VENDOR])


def memory_array_mapped_address(handle: int, array_handle: int, start: int, end: int) -> bytes:
    """Type 19 (2.7+ layout, 0x1F bytes) for RAM at [start, end): addresses in KiB, the last
    one inclusive, or the extended byte addresses when they do not fit 32 bits of KiB.
    """
    first_kib, last_kib = start >> 10, (end >> 10) - 1
    if last_kib < ADDRESS_EXTENDED:
        formatted = struct.pack("<IIHBQQ", first_kib, last_kib, array_handle, 1, 0, 0)
    else:
        formatted = struct.pack("<IIHBQQ", ADDRESS_EXTENDED, ADDRESS_EXTENDED, array_handle,
                                1, start, end - 1)
    return structure(MEMORY_ARRAY_MAPPED_ADDRESS, handle, formatted, [])


def system_boot_information(handle: int) -> bytes:
    """Type 32 (0x0B bytes): "no errors detected"."""
    return structure(SYSTEM_BOOT_INFORMATION, handle, bytes(6) + b"\0", [])


def end_of_table(handle: int) -> bytes:
    """Type 127: where a reader stops (SMBIOS 3.0 entry points give no structure count)."""
    return structure(END_OF_TABLE, handle, b"", [])


def ram_ranges(memory_bytes: int) -> list[tuple[int, int]]:
    """Guest-physical RAM as vmrun maps it: below the PCI hole, the rest above 4 GiB."""
    low = min(memory_bytes, layout.LOW_RAM_END)
    ranges = [(0, low)]
    if memory_bytes > low:
        ranges.append((layout.HIGH_RAM_START, layout.HIGH_RAM_START + memory_bytes - low))
    return ranges


def entry_point(table_len: int, table_addr: int) -> bytes:
    """The SMBIOS 3.0 64-bit entry point, checksummed over its 24 bytes."""
    entry = bytearray(struct.pack("<5sBBBBBBBIQ", b"_SM3_", 0, ENTRY_POINT_LEN, SMBIOS_MAJOR,
                                  SMBIOS_MINOR, SMBIOS_DOCREV, ENTRY_POINT_REVISION, 0,
                                  table_len, table_addr))
    entry[5] = (-sum(entry)) & 0xFF
    return bytes(entry)


def build_smbios(uuid: uuidlib.UUID, ncpus: int, memory_bytes: int,
                 base: int = layout.SMBIOS_BASE, product: str = "vmrun") -> bytes:
    """The bytes to copy into guest RAM at ``base``: entry point, padding, structure table."""
    if base % 16:
        raise ValueError(f"SMBIOS base {base:#x} is not 16-byte aligned")
    if ncpus < 1 or memory_bytes < 1 << 20:
        raise ValueError("SMBIOS needs at least one vCPU and 1 MiB of RAM")
    structs: list[bytes] = []

    def add(make: Callable[..., bytes], *args: object) -> int:
        handle = len(structs)
        structs.append(make(handle, *args))
        return handle

    add(bios_information)
    add(system_information, uuid, product)
    add(system_enclosure)
    for cpu in range(ncpus):
        add(processor_information, cpu)
    array = add(physical_memory_array, memory_bytes)
    add(memory_device, array, memory_bytes)
    for start, end in ram_ranges(memory_bytes):
        add(memory_array_mapped_address, array, start, end)
    add(system_boot_information)
    add(end_of_table)
    table = b"".join(structs)
    entry = entry_point(len(table), base + TABLE_OFFSET)
    blob = entry + bytes(TABLE_OFFSET - len(entry)) + table
    if base < SMBIOS_AREA_END < base + len(blob):
        raise ValueError(f"SMBIOS tables ({len(blob)} bytes) do not fit below 1 MiB")
    return blob
