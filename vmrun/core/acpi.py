"""ACPI tables generated in Python: RSDP, XSDT, FADT, FACS, MADT, DSDT and (with ECAM) MCFG.

Why these and no more: they are what a Linux guest needs to find its CPUs (MADT), interrupt
routing (MADT overrides, PCI _PRT in the DSDT), power-off and reset (FADT, \\_S5), the PM timer
and the legacy devices. The DSDT is kept small on purpose: the guest kernel runs its AML
interpreter in kernel mode, which some KVMs emulate instruction by instruction, so every object
costs boot time. The power button is the fixed-feature one (PM1 PWRBTN_STS), so a shutdown
request reaches the guest without any AML.

Every port, IRQ and address comes from :mod:`vmrun.core.layout`, the constants the device
models use. Table layouts and field offsets follow the ACPI specification 6.4, chapter 5.2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmrun.core import aml, layout

OEM_ID = b"VMRUN "
OEM_TABLE_ID = b"VMRUNVM "
OEM_REVISION = 1
CREATOR_ID = b"VMRN"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR_ID = b"VMRUN\0\0\0"

SDT_HEADER_LEN = 36
FADT_LEN = 276              # FADT revision 6
FADT_REVISION = 6
FADT_MINOR_REVISION = 4     # ACPI 6.4
FACS_LEN = 64
FACS_ALIGN = 64
RSDP_LEN = 36
RSDP_V1_LEN = 20

# FADT Fixed Feature Flags (ACPI 6.4, table 5.10).
WBINVD = 1 << 0
PROC_C1 = 1 << 2
PWR_BUTTON = 1 << 4         # set: no fixed-feature power button (we leave it clear)
SLP_BUTTON = 1 << 5         # set: no fixed-feature sleep button
TMR_VAL_EXT = 1 << 8        # the PM timer is 32 bits wide
RESET_REG_SUP = 1 << 10
FADT_FLAGS = WBINVD | PROC_C1 | SLP_BUTTON | TMR_VAL_EXT | RESET_REG_SUP

# FADT IA-PC Boot Architecture Flags (table 5.11).
LEGACY_DEVICES = 1 << 0
HAS_8042 = 1 << 1
VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH = LEGACY_DEVICES | HAS_8042 | VGA_NOT_PRESENT

CMOS_CENTURY_INDEX = 0x32
P_LVL2_LAT_NONE = 101       # > 100 us: C2 not supported
P_LVL3_LAT_NONE = 1001      # > 1000 us: C3 not supported

# Generic Address Structure (5.2.3.2).
GAS_SYSTEM_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3

# MADT (5.2.12).
MADT_REVISION = 5
PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_INT_SRC_OVERRIDE, MADT_LOCAL_APIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1 << 0
MPS_ACTIVE_HIGH = 0b01          # MPS INTI flags: polarity in bits 0-1 ...
MPS_LEVEL = 0b11 << 2           # ... trigger mode in bits 2-3
ALL_PROCESSORS = 0xFF
LINT1 = 1
MAX_CPUS = 254                  # 8-bit APIC ids, and the IOAPIC takes id = ncpus

DSDT_REVISION = 2               # 64-bit AML integers


@dataclass
class AcpiPlatform:
    """What the tables describe: the parts of the machine that vary with the machine file."""

    ncpus: int
    serial_ports: list[tuple[str, int, int]]   # (device name e.g. "COM1", I/O port, ISA IRQ)
    dsdt_extra: list[bytes] = field(default_factory=list)  # AML terms put inside \_SB
    ecam: tuple[int, int, int, int] | None = None  # (base, segment, start bus, end bus)


@dataclass
class AcpiTables:
    """The tables laid out for one guest-physical base address.

    ``blob`` is copied into guest RAM at ``base``; ``tables`` maps each signature ("RSDP",
    "FACS", "DSDT", "FACP", "APIC", "MCFG", "XSDT") to its guest-physical address and bytes.
    """

    blob: bytes
    rsdp_addr: int
    tables: dict[str, tuple[int, bytes]]
    base: int = layout.ACPI_BASE


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte as 0) sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (5.2.6), then ``body``, checksummed."""
    header = struct.pack("<4sIBB6s8sI4sI", signature, SDT_HEADER_LEN + len(body), revision, 0,
                         OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(space: int, bit_width: int, address: int, access_size: int) -> bytes:
    """A Generic Address Structure (12 bytes), bit offset 0."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def rsdp(xsdt_addr: int) -> bytes:
    """The Root System Description Pointer, revision 2: XSDT only (no RSDT)."""
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_LEN,
                                 xsdt_addr, 0))
    data[8] = checksum(data[:RSDP_V1_LEN])
    data[32] = checksum(data)
    return bytes(data)


def xsdt(entries: list[int]) -> bytes:
    """The Extended System Description Table: 64-bit addresses of the other tables."""
    return sdt(b"XSDT", 1, struct.pack(f"<{len(entries)}Q", *entries))


def fadt(facs_addr: int, dsdt_addr: int) -> bytes:
    """The Fixed ACPI Description Table (5.2.9), revision 6, 276 bytes.

    SMI_CMD is 0 (the machine is in ACPI mode from reset), no GPE blocks, the 32-bit PM timer
    and the 0xCF9 reset register. The FACS address is given only in X_FIRMWARE_CTRL, because
    the spec wants FIRMWARE_CTRL zero when X_FIRMWARE_CTRL is set; the DSDT in both.
    """
    table = bytearray(FADT_LEN)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, table, offset, *values)

    put(40, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)   # DSDT
    put(45, "<B", 0)                                 # Preferred_PM_Profile: unspecified
    put(46, "<H", layout.SCI_IRQ)                    # SCI_INT
    put(48, "<I", 0)                                 # SMI_CMD: ACPI always enabled
    put(56, "<I", layout.PM1A_EVT_PORT)              # PM1a_EVT_BLK
    put(64, "<I", layout.PM1A_CNT_PORT)              # PM1a_CNT_BLK
    put(76, "<I", layout.PM_TMR_PORT)                # PM_TMR_BLK
    put(88, "<BBBB", layout.PM1A_EVT_LEN, layout.PM1A_CNT_LEN, 0, layout.PM_TMR_LEN)
    put(96, "<HH", P_LVL2_LAT_NONE, P_LVL3_LAT_NONE)
    put(108, "<B", CMOS_CENTURY_INDEX)               # CENTURY
    put(109, "<H", IAPC_BOOT_ARCH)
    put(112, "<I", FADT_FLAGS)
    table[116:128] = gas(GAS_SYSTEM_IO, 8, layout.RESET_PORT, ACCESS_BYTE)   # RESET_REG
    put(128, "<B", layout.RESET_VALUE)
    put(131, "<B", FADT_MINOR_REVISION)
    put(132, "<QQ", facs_addr, dsdt_addr)            # X_FIRMWARE_CTRL, X_DSDT
    table[148:160] = gas(GAS_SYSTEM_IO, 8 * layout.PM1A_EVT_LEN, layout.PM1A_EVT_PORT,
                         ACCESS_WORD)                # X_PM1a_EVT_BLK
    table[172:184] = gas(GAS_SYSTEM_IO, 8 * layout.PM1A_CNT_LEN, layout.PM1A_CNT_PORT,
                         ACCESS_WORD)                # X_PM1a_CNT_BLK
    table[208:220] = gas(GAS_SYSTEM_IO, 8 * layout.PM_TMR_LEN, layout.PM_TMR_PORT,
                         ACCESS_DWORD)               # X_PM_TMR_BLK
    table[268:276] = HYPERVISOR_VENDOR_ID
    return sdt(b"FACP", FADT_REVISION, bytes(table[SDT_HEADER_LEN:]))


def facs() -> bytes:
    """The Firmware ACPI Control Structure (5.2.10): no waking vector, no global lock owner."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_LEN, 0, 0, 0, 0, 0, 2, 0)


def madt(ncpus: int) -> bytes:
    """The Multiple APIC Description Table (5.2.12).

    One enabled local APIC per vCPU (APIC id = processor UID = index), one IOAPIC with id
    ``ncpus`` and GSI base 0, the two ISA overrides a PC has (the PIT's IRQ0 on GSI 2, the SCI
    level-triggered active high), and NMI on LINT1 of every processor.
    """
    body = struct.pack("<II", layout.LAPIC_BASE, PCAT_COMPAT)
    for cpu in range(ncpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ncpus, 0, layout.IOAPIC_BASE, 0)
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, 0, 2, 0)
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, layout.SCI_IRQ,
                        layout.SCI_IRQ, MPS_ACTIVE_HIGH | MPS_LEVEL)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, LINT1)
    return sdt(b"APIC", MADT_REVISION, body)


def mcfg(base: int, segment: int, start_bus: int, end_bus: int) -> bytes:
    """The PCI Express memory-mapped configuration table: one ECAM allocation.

    ``base`` is the address bus 0 would have, even when ``start_bus`` is not 0 (PCI Firmware
    Specification, MCFG).
    """
    return sdt(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", base, segment, start_bus,
                                                  end_bus, 0))


def _serial_device(dev_name: str, uid: int, port: int, irq: int) -> bytes:
    return aml.device(
        dev_name,
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0501"))),
        aml.name("_UID", aml.integer(uid)),
        aml.name("_STA", aml.integer(aml.STA_PRESENT_ENABLED)),
        aml.name("_CRS", aml.resource_template(aml.io(port, 8), aml.irq_no_flags(irq))))


def dsdt_devices(platform: AcpiPlatform) -> list[bytes]:
    """The legacy devices under \\_SB: serial ports, RTC, PS/2 keyboard and mouse."""
    devices = [_serial_device(dev_name, i + 1, port, irq)
               for i, (dev_name, port, irq) in enumerate(platform.serial_ports)]
    devices.append(aml.device(
        "RTC",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0B00"))),
        aml.name("_CRS", aml.resource_template(aml.io(layout.RTC_PORT, 2),
                                               aml.irq_no_flags(layout.RTC_IRQ)))))
    devices.append(aml.device(
        "KBD",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0303"))),
        aml.name("_CRS", aml.resource_template(aml.io(layout.I8042_DATA_PORT, 1),
                                               aml.io(layout.I8042_CMD_PORT, 1),
                                               aml.irq_no_flags(layout.I8042_KBD_IRQ)))))
    devices.append(aml.device(
        "MOU",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0F13"))),
        aml.name("_CRS", aml.resource_template(aml.irq_no_flags(layout.I8042_AUX_IRQ)))))
    return devices


def dsdt(platform: AcpiPlatform) -> bytes:
    """The Differentiated System Description Table: \\_S5 and the \\_SB devices."""
    slp_typ = aml.integer(layout.SLP_TYP_S5)
    body = aml.name("\\_S5", aml.package(slp_typ, slp_typ, aml.ZERO, aml.ZERO))
    body += aml.scope("\\_SB", *dsdt_devices(platform), *platform.dsdt_extra)
    return sdt(b"DSDT", DSDT_REVISION, body)


def build_acpi(platform: AcpiPlatform, base: int = layout.ACPI_BASE) -> AcpiTables:
    """Lay the tables out from ``base`` (16-aligned): RSDP first, where a kernel scanning
    0xE0000-0xFFFFF on 16-byte boundaries finds it; the FACS 64-aligned as required.
    """
    if base % 16:
        raise ValueError(f"ACPI base {base:#x} is not 16-byte aligned")
    if not 1 <= platform.ncpus <= MAX_CPUS:
        raise ValueError(f"{platform.ncpus} vCPUs: the MADT describes 1..{MAX_CPUS}")
    tables: dict[str, tuple[int, bytes]] = {}
    blob = bytearray()

    def place(sig: str, data: bytes, align: int = 16) -> int:
        blob.extend(bytes(-(base + len(blob)) % align))
        addr = base + len(blob)
        blob.extend(data)
        tables[sig] = (addr, data)
        return addr

    rsdp_addr = place("RSDP", bytes(RSDP_LEN))       # filled in once the XSDT is placed
    facs_addr = place("FACS", facs(), FACS_ALIGN)
    dsdt_addr = place("DSDT", dsdt(platform))
    entries = [place("FACP", fadt(facs_addr, dsdt_addr)), place("APIC", madt(platform.ncpus))]
    if platform.ecam is not None:
        entries.append(place("MCFG", mcfg(*platform.ecam)))
    xsdt_addr = place("XSDT", xsdt(entries))
    pointer = rsdp(xsdt_addr)
    blob[0:RSDP_LEN] = pointer
    tables["RSDP"] = (rsdp_addr, pointer)
    if base < layout.SMBIOS_BASE < base + len(blob):
        raise ValueError(f"ACPI tables ({len(blob)} bytes) overlap the SMBIOS area")
    return AcpiTables(bytes(blob), rsdp_addr, tables, base)
