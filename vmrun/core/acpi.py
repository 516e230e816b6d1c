"""ACPI tables generated in Python: RSDP, XSDT, FADT, FACS, MADT, MCFG and a small DSDT.

The DSDT is kept small on purpose: a guest kernel runs its AML interpreter in kernel mode, which
some KVMs emulate instruction by instruction. Every port, IRQ and address comes from
:mod:`vmrun.core.layout`, the same constants the device models use. The power button is the
fixed-feature one (PM1 PWRBTN_STS), so SIGTERM reaches the guest without any AML.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmrun.core import aml, layout

OEM_ID = b"VMRUN "
OEM_TABLE_ID = b"VMRUNVM "
CREATOR_ID = b"VMRN"
HYPERVISOR_ID = b"VMRUN\0\0\0"

# FADT flags (ACPI 6.4, table 5.10)
WBINVD = 1 << 0
PROC_C1 = 1 << 2
SLP_BUTTON = 1 << 5
TMR_VAL_EXT = 1 << 8
RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags
LEGACY_DEVICES = 1 << 0
HAS_8042 = 1 << 1
VGA_NOT_PRESENT = 1 << 2


@dataclass
class AcpiPlatform:
    ncpus: int
    serial_ports: list[tuple[str, int, int]]          # (name, port, irq)
    dsdt_extra: list[bytes] = field(default_factory=list)
    ecam: tuple[int, int, int, int] | None = None     # (base, segment, start bus, end bus)


@dataclass
class AcpiTables:
    blob: bytes
    rsdp_addr: int
    tables: dict[str, tuple[int, bytes]]


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header, then ``body``, checksummed."""
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID,
                         OEM_TABLE_ID, 1, CREATOR_ID, 1)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(space: int, width: int, address: int, access: int) -> bytes:
    """Generic Address Structure (space 1 = system I/O)."""
    return struct.pack("<BBBBQ", space, width, 0, access, address)


def fadt(facs_addr: int, dsdt_addr: int) -> bytes:
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    put(36, "<II", facs_addr, dsdt_addr)
    put(45, "<BH", 0, layout.SCI_IRQ)                # preferred PM profile: unspecified
    put(48, "<I", 0)                                 # SMI_CMD: ACPI is always enabled
    put(56, "<I", layout.PM1A_EVT_PORT)
    put(64, "<I", layout.PM1A_CNT_PORT)
    put(76, "<I", layout.PM_TMR_PORT)
    put(88, "<BBBB", layout.PM1A_EVT_LEN, layout.PM1A_CNT_LEN, 0, layout.PM_TMR_LEN)
    put(96, "<HH", 101, 1001)                        # no C2, no C3
    put(108, "<B", 0x32)                             # CMOS century register
    put(109, "<H", LEGACY_DEVICES | HAS_8042 | VGA_NOT_PRESENT)
    put(112, "<I", WBINVD | PROC_C1 | SLP_BUTTON | TMR_VAL_EXT | RESET_REG_SUP)
    body[116 - 36:128 - 36] = gas(1, 8, layout.RESET_PORT, 1)
    put(128, "<B", layout.RESET_VALUE)
    put(131, "<B", 4)                                # FADT minor version (6.4)
    put(132, "<QQ", facs_addr, dsdt_addr)
    body[148 - 36:160 - 36] = gas(1, 32, layout.PM1A_EVT_PORT, 2)
    body[172 - 36:184 - 36] = gas(1, 16, layout.PM1A_CNT_PORT, 2)
    body[208 - 36:220 - 36] = gas(1, 32, layout.PM_TMR_PORT, 3)
    body[268 - 36:276 - 36] = HYPERVISOR_ID
    return sdt(b"FACP", 6, bytes(body))


def facs() -> bytes:
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", 64, 0, 0, 0, 0, 0, 2, 0)


def madt(ncpus: int) -> bytes:
    body = struct.pack("<II", layout.LAPIC_BASE, 1)   # PCAT_COMPAT: dual 8259s present
    for cpu in range(ncpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)
    body += struct.pack("<BBBBII", 1, 12, ncpus, 0, layout.IOAPIC_BASE, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)            # IRQ0 -> GSI2
    body += struct.pack("<BBBBIH", 2, 10, 0, layout.SCI_IRQ, layout.SCI_IRQ, 0x000D)  # level
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)             # NMI on LINT1, every CPU
    return sdt(b"APIC", 5, body)


def mcfg(base: int, segment: int, start: int, end: int) -> bytes:
    return sdt(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", base, segment, start, end, 0))


def dsdt(platform: AcpiPlatform) -> bytes:
    devices = []
    for i, (dev_name, port, irq) in enumerate(platform.serial_ports):
        devices.append(aml.device(
            dev_name,
            aml.name("_HID", aml.integer(aml.eisa_id("PNP0501"))),
            aml.name("_UID", aml.integer(i + 1)),
            aml.name("_CRS", aml.resource_template(aml.io(port, 8), aml.irq_no_flags(irq)))))
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
    body = aml.name("\\_S5", aml.package(aml.integer(layout.SLP_TYP_S5),
                                         aml.integer(layout.SLP_TYP_S5),
                                         aml.integer(0), aml.integer(0)))
    body += aml.scope("\\_SB", *devices, *platform.dsdt_extra)
    return sdt(b"DSDT", 2, body)


def rsdp(xsdt_addr: int) -> bytes:
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36,
                                 xsdt_addr, 0))
    data[8] = checksum(data[:20])
    data[32] = checksum(data)
    return bytes(data)


def build_acpi(platform: AcpiPlatform, base: int = layout.ACPI_BASE) -> AcpiTables:
    """Lay the tables out from ``base``: RSDP first (16-aligned, where the kernel scans)."""
    tables: dict[str, tuple[int, bytes]] = {}
    blob = bytearray()

    def place(name: str, data: bytes, align: int = 16) -> int:
        blob.extend(bytes(-len(blob) % align))
        addr = base + len(blob)
        blob.extend(data)
        tables[name] = (addr, data)
        return addr

    rsdp_addr = place("RSDP", bytes(36))
    facs_addr = place("FACS", facs(), 64)
    dsdt_addr = place("DSDT", dsdt(platform))
    entries = [place("FACP", fadt(facs_addr, dsdt_addr)), place("APIC", madt(platform.ncpus))]
    if platform.ecam is not None:
        entries.append(place("MCFG", mcfg(*platform.ecam)))
    xsdt_addr = place("XSDT", sdt(b"XSDT", 1, struct.pack(f"<{len(entries)}Q", *entries)))
    real = rsdp(xsdt_addr)
    blob[0:36] = real
    tables["RSDP"] = (rsdp_addr, real)
    if len(blob) > 0x10000:
        raise ValueError("ACPI tables do not fit below the SMBIOS area")
    return AcpiTables(bytes(blob), rsdp_addr, tables)
