"""ACPI tables and the AML encoder: known encodings, checksums and layout, and what ACPICA's
own tools (``iasl -d``, ``acpiexec``) make of the generated tables.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmrun.core import acpi, aml, layout
from vmrun.core.acpi import AcpiPlatform, AcpiTables, build_acpi
from vmrun.core.pci_acpi import ecam_allocation, ecam_reservation_aml

IASL = shutil.which("iasl")
ACPIEXEC = shutil.which("acpiexec")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
needs_acpiexec = pytest.mark.skipif(ACPIEXEC is None,
                                    reason="acpiexec (acpica-tools) is not installed")

SERIAL = [("COM1", layout.COM1_PORT, layout.COM1_IRQ), ("COM2", layout.COM2_PORT,
                                                         layout.COM2_IRQ)]
ECAM = (layout.ECAM_BASE, 0, 0, 255)
SDT_SIGNATURES = ["FACP", "APIC", "DSDT", "MCFG", "XSDT"]


def pci_root_fragment() -> bytes:
    """A PCI root like the PCI code builds: _HID/_CID, _SEG/_BBN/_UID, _CRS windows, _PRT."""
    prt = [aml.package(aml.integer((slot << 16) | 0xFFFF), aml.integer(pin), aml.ZERO,
                       aml.integer(16 + (slot + pin) % 8))
           for slot in (1, 2) for pin in range(4)]
    crs = aml.resource_template(
        aml.word_bus_number(0, 0xFF),
        aml.io(layout.PCI_CONFIG_ADDRESS, 8),
        aml.word_io(0x0000, 0x0CF7),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(0xA0000, 0xBFFFF),
        aml.dword_memory(layout.PCI_MMIO32_START, layout.ECAM_BASE - 1),
        aml.qword_memory(0x1_0000_0000 * 8, 0x1_0000_0000 * 16 - 1),
    )
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0A08"))),
        aml.name("_CID", aml.integer(aml.eisa_id("PNP0A03"))),
        aml.name("_SEG", aml.ZERO),
        aml.name("_BBN", aml.ZERO),
        aml.name("_UID", aml.ZERO),
        aml.name("_CRS", crs),
        aml.name("_PRT", aml.package(*prt)),
    )


@pytest.fixture
def platform() -> AcpiPlatform:
    return AcpiPlatform(ncpus=2, serial_ports=list(SERIAL),
                        dsdt_extra=[pci_root_fragment(), ecam_reservation_aml()], ecam=ECAM)


@pytest.fixture
def tables(platform: AcpiPlatform) -> AcpiTables:
    return build_acpi(platform)


# --- AML: names ------------------------------------------------------------------------------
@pytest.mark.parametrize("path, encoded", [
    ("_HID", b"_HID"),
    ("RTC", b"RTC_"),
    ("A", b"A___"),
    ("\\_SB", b"\\_SB_"),
    ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),
    ("_SB.PCI0", b"\x2e_SB_PCI0"),
    ("\\_SB.PCI0.COM1", b"\\\x2f\x03_SB_PCI0COM1"),
    ("^FOO", b"^FOO_"),
    ("^^A.B", b"^^\x2eA___B___"),
    ("\\", b"\\\x00"),
    ("", b"\x00"),
])
def test_name_string(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["lower", "1ABC", "TOOLONG", "A-B", "\\_SB..X", "Ä"])
def test_bad_names_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        aml.name_string(path)


# --- AML: PkgLength --------------------------------------------------------------------------
def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of the PkgLength at the start of ``data``, per ACPI 20.2.4."""
    follow = data[0] >> 6
    if follow == 0:
        return data[0] & 0x3F, 1
    value = data[0] & 0x0F
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"),
    (63, b"\x3f"),
    (64, b"\x40\x04"),
    (4095, b"\x4f\xff"),
    (4096, b"\x80\x00\x01"),
    ((1 << 20) - 1, b"\x8f\xff\xff"),
    (1 << 20, b"\xc0\x00\x00\x01"),
    ((1 << 28) - 1, b"\xcf\xff\xff\xff"),
])
def test_encode_pkg_length(value: int, encoded: bytes) -> None:
    assert aml.encode_pkg_length(value) == encoded
    assert decode_pkg_length(encoded) == (value, len(encoded))


def test_pkg_length_out_of_range() -> None:
    with pytest.raises(ValueError):
        aml.encode_pkg_length(1 << 28)
    with pytest.raises(ValueError):
        aml.pkg_length((1 << 28) - 4)


@pytest.mark.parametrize("payload, size", [
    (0, 1), (62, 1), (63, 2), (4093, 2), (4094, 3), ((1 << 20) - 4, 3), ((1 << 20) - 3, 4),
])
def test_pkg_length_counts_itself(payload: int, size: int) -> None:
    encoded = aml.pkg_length(payload)
    assert len(encoded) == size
    assert decode_pkg_length(encoded) == (payload + size, size)


def test_large_device_gets_multibyte_pkg_length() -> None:
    body = aml.name("BIG_", aml.buffer(bytes(5000)))
    dev = aml.device("DEV0", body)
    assert dev[:2] == b"\x5b\x82"
    value, used = decode_pkg_length(dev[2:])
    assert used == 3 and value == len(dev) - 2


# --- AML: data -------------------------------------------------------------------------------
@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"),
    (1, b"\x01"),
    (2, b"\x0a\x02"),
    (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"),
    (0xFFFF, b"\x0b\xff\xff"),
    (0x10000, b"\x0c\x00\x00\x01\x00"),
    (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
    (0x1_0000_0000, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
    ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
])
def test_integer(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


def test_integer_constants_and_range() -> None:
    assert (aml.ZERO, aml.ONE, aml.ONES) == (b"\x00", b"\x01", b"\xff")
    assert aml.byte_const(1) == b"\x0a\x01"
    assert aml.word_const(1) == b"\x0b\x01\x00"
    assert aml.dword_const(1) == b"\x0c\x01\x00\x00\x00"
    assert aml.qword_const(1) == b"\x0e\x01" + bytes(7)
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            aml.integer(bad)


def test_string() -> None:
    assert aml.string("ab") == b"\x0dab\x00"
    assert aml.string("") == b"\x0d\x00"
    with pytest.raises(ValueError):
        aml.string("a\0b")


@pytest.mark.parametrize("text, value", [
    ("PNP0501", 0x0105D041),
    ("PNP0A03", 0x030AD041),
    ("PNP0A08", 0x080AD041),
    ("PNP0B00", 0x000BD041),
    ("PNP0303", 0x0303D041),
    ("PNP0F13", 0x130FD041),
])
def test_eisa_id(text: str, value: int) -> None:
    assert aml.eisa_id(text) == value


@pytest.mark.parametrize("text", ["PNP050", "pnp0501", "PNP05G1", "1NP0501"])
def test_bad_eisa_id(text: str) -> None:
    with pytest.raises(ValueError):
        aml.eisa_id(text)


# --- AML: terms ------------------------------------------------------------------------------
def test_term_encodings() -> None:
    assert aml.name("_UID", aml.ONE) == b"\x08_UID\x01"
    assert aml.package(aml.ONE, aml.ZERO) == b"\x12\x04\x02\x01\x00"
    assert aml.package() == b"\x12\x02\x00"
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"
    assert aml.device("COM1") == b"\x5b\x82\x05COM1"
    assert aml.method("_STA", 0, aml.return_(aml.integer(0x0F))) == \
        b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.method("M", 2, serialized=True)[6] == 0x0A
    assert aml.method("M", 1, sync_level=3)[6] == 0x31
    assert aml.return_(aml.arg(0)) == b"\xa4\x68"
    assert aml.local(7) == b"\x67"
    assert aml.notify("\\_SB.PCI0", aml.integer(0x80)) == b"\x86\\\x2e_SB_PCI0\x0a\x80"
    with pytest.raises(ValueError):
        aml.method("M", 8)
    with pytest.raises(ValueError):
        aml.arg(7)


def test_package_over_255_elements_is_a_var_package() -> None:
    pkg = aml.package(*[aml.ZERO] * 300)
    assert pkg[0] == aml.VAR_PACKAGE_OP
    value, used = decode_pkg_length(pkg[1:])
    assert value == len(pkg) - 1
    assert pkg[1 + used:1 + used + 3] == b"\x0b\x2c\x01"


# --- AML: resource descriptors ---------------------------------------------------------------
def test_small_descriptors() -> None:
    assert aml.io(0x3F8, 8) == bytes.fromhex("47 01 f8 03 f8 03 01 08")
    assert aml.irq_no_flags(4) == bytes.fromhex("22 10 00")
    assert aml.irq_no_flags(1, 12) == bytes.fromhex("22 02 10")
    assert aml.irq(5) == bytes.fromhex("23 20 00 01")
    assert aml.irq(5, edge=False, active_low=True, shared=True) == bytes.fromhex("23 20 00 18")
    with pytest.raises(ValueError):
        aml.irq_no_flags(16)


def test_large_descriptors() -> None:
    assert aml.memory32_fixed(0xFED00000, 0x400) == \
        bytes.fromhex("86 09 00 01 00 00 d0 fe 00 04 00 00")
    assert aml.word_bus_number(0, 0xFF) == \
        bytes.fromhex("88 0d 00 02 0c 00 0000 0000 ff00 0000 0001")
    assert aml.word_io(0x0D00, 0xFFFF) == \
        bytes.fromhex("88 0d 00 01 0c 03 0000 000d ffff 0000 00f3")
    assert aml.dword_io(0, 0xFFFF)[:6] == bytes.fromhex("87 17 00 01 0c 03")
    assert aml.dword_memory(0xA0000, 0xBFFFF) == bytes.fromhex(
        "87 17 00 00 0c 01 00000000 00000a00 ffff0b00 00000000 00000200")
    assert aml.dword_memory(0, 0xFFF, cache=aml.MEM_PREFETCHABLE)[5] == 0x07
    qword = aml.qword_memory(1 << 36, (1 << 37) - 1)
    assert qword[:6] == bytes.fromhex("8a 2b 00 00 0c 01") and len(qword) == 0x2B + 3
    assert struct.unpack_from("<5Q", qword, 6) == (0, 1 << 36, (1 << 37) - 1, 0, 1 << 36)
    assert aml.word_io(0, 0xFF, producer=False)[4] == 0x0D
    assert aml.interrupt(16) == bytes.fromhex("89 06 00 01 01 10000000")
    assert aml.interrupt(16, 17, edge=True, active_low=True, shared=True) == \
        bytes.fromhex("89 0a 00 0f 02 10000000 11000000")
    with pytest.raises(ValueError):
        aml.word_io(0x100, 0xFF)


def test_resource_template_end_tag() -> None:
    assert aml.resource_template() == aml.buffer(b"\x79\x00")
    data = aml.io(0x60, 1) + aml.irq_no_flags(1)
    plain = aml.resource_template(aml.io(0x60, 1), aml.irq_no_flags(1))
    assert plain.endswith(data + b"\x79\x00")
    summed = aml.resource_template(aml.io(0x60, 1), aml.irq_no_flags(1), checksum=True)
    template = summed[-(len(data) + 2):]
    assert template[:-2] == data and template[-2] == 0x79
    assert sum(template) % 256 == 0


# --- tables: layout and checksums ------------------------------------------------------------
def test_every_table_checksums_to_zero(tables: AcpiTables) -> None:
    for sig in SDT_SIGNATURES:
        addr, data = tables.tables[sig]
        assert data[:4] == sig.encode()
        assert struct.unpack_from("<I", data, 4)[0] == len(data)
        assert sum(data) % 256 == 0, sig
        assert data[10:16] == acpi.OEM_ID and data[16:24] == acpi.OEM_TABLE_ID


def test_rsdp(tables: AcpiTables) -> None:
    addr, rsdp = tables.tables["RSDP"]
    assert addr == tables.rsdp_addr == layout.ACPI_BASE and addr % 16 == 0
    assert len(rsdp) == 36 and rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0
    assert sum(rsdp) % 256 == 0
    assert rsdp[9:15] == b"VMRUN " and rsdp[15] == 2
    rsdt, length, xsdt = struct.unpack_from("<IIQ", rsdp, 16)
    assert (rsdt, length, xsdt) == (0, 36, tables.tables["XSDT"][0])


def test_tables_are_placed_in_the_blob(tables: AcpiTables) -> None:
    base = layout.ACPI_BASE
    for sig, (addr, data) in tables.tables.items():
        assert tables.blob[addr - base:addr - base + len(data)] == data, sig
    assert base + len(tables.blob) <= layout.SMBIOS_BASE    # 0xE0000..0xEFFFF
    facs_addr, facs = tables.tables["FACS"]
    assert facs_addr % 64 == 0 and len(facs) == 64 and facs[:4] == b"FACS"


def test_xsdt_lists_the_tables(tables: AcpiTables) -> None:
    _, xsdt = tables.tables["XSDT"]
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert list(entries) == [tables.tables[s][0] for s in ("FACP", "APIC", "MCFG")]


def test_no_mcfg_without_ecam(platform: AcpiPlatform) -> None:
    platform.ecam = None
    tables = build_acpi(platform)
    assert "MCFG" not in tables.tables
    _, xsdt = tables.tables["XSDT"]
    assert len(xsdt) == 36 + 16


def test_other_base(platform: AcpiPlatform) -> None:
    tables = build_acpi(platform, base=0x1000_0000)
    assert tables.rsdp_addr == 0x1000_0000
    _, fadt = tables.tables["FACP"]
    assert struct.unpack_from("<Q", fadt, 140)[0] == tables.tables["DSDT"][0]
    with pytest.raises(ValueError):
        build_acpi(platform, base=0xE0008)


@pytest.mark.parametrize("ncpus", [0, acpi.MAX_CPUS + 1])
def test_cpu_count_is_checked(platform: AcpiPlatform, ncpus: int) -> None:
    platform.ncpus = ncpus
    with pytest.raises(ValueError):
        build_acpi(platform)


def test_fadt_fields(tables: AcpiTables) -> None:
    _, fadt = tables.tables["FACP"]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == acpi.FADT_MINOR_REVISION
    firmware_ctrl, dsdt32 = struct.unpack_from("<II", fadt, 36)
    x_firmware_ctrl, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
    assert firmware_ctrl == 0 and x_firmware_ctrl == tables.tables["FACS"][0]
    assert dsdt32 == x_dsdt == tables.tables["DSDT"][0]
    assert struct.unpack_from("<H", fadt, 46)[0] == layout.SCI_IRQ
    assert struct.unpack_from("<I", fadt, 48)[0] == 0                       # SMI_CMD
    assert struct.unpack_from("<I", fadt, 56)[0] == layout.PM1A_EVT_PORT
    assert struct.unpack_from("<I", fadt, 64)[0] == layout.PM1A_CNT_PORT
    assert struct.unpack_from("<I", fadt, 76)[0] == layout.PM_TMR_PORT
    assert struct.unpack_from("<I", fadt, 80)[0] == 0                       # no GPE0
    assert tuple(fadt[88:94]) == (4, 2, 0, 4, 0, 0)
    assert fadt[108] == 0x32
    assert struct.unpack_from("<H", fadt, 109)[0] == 0b111
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & acpi.TMR_VAL_EXT and flags & acpi.RESET_REG_SUP and flags & acpi.SLP_BUTTON
    assert not flags & acpi.PWR_BUTTON
    assert fadt[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, layout.RESET_PORT)
    assert fadt[128] == layout.RESET_VALUE
    assert fadt[148:160] == struct.pack("<BBBBQ", 1, 32, 0, 2, layout.PM1A_EVT_PORT)
    assert fadt[172:184] == struct.pack("<BBBBQ", 1, 16, 0, 2, layout.PM1A_CNT_PORT)
    assert fadt[208:220] == struct.pack("<BBBBQ", 1, 32, 0, 3, layout.PM_TMR_PORT)
    assert fadt[268:276] == b"VMRUN\0\0\0"


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 44
    while off < len(madt):
        etype, elen = madt[off], madt[off + 1]
        out.append((etype, madt[off:off + elen]))
        off += elen
    assert off == len(madt)
    return out


def test_madt(platform: AcpiPlatform) -> None:
    platform.ncpus = 4
    _, madt = build_acpi(platform).tables["APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_BASE, 1)
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for t, e in entries if t == 0]
    assert lapics == [(0, 8, i, i, 1) for i in range(4)]
    ioapics = [struct.unpack("<BBBBII", e) for t, e in entries if t == 1]
    assert ioapics == [(1, 12, 4, 0, layout.IOAPIC_BASE, 0)]
    overrides = [struct.unpack("<BBBBIH", e)[2:] for t, e in entries if t == 2]
    assert overrides == [(0, 0, 2, 0), (0, 9, 9, 0x0D)]
    nmis = [struct.unpack("<BBBHB", e) for t, e in entries if t == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]


def test_mcfg(tables: AcpiTables) -> None:
    _, mcfg = tables.tables["MCFG"]
    assert len(mcfg) == 60
    assert struct.unpack_from("<QHBB", mcfg, 44) == (layout.ECAM_BASE, 0, 0, 255)


def test_dsdt_stays_small() -> None:
    dsdt = acpi.dsdt(AcpiPlatform(ncpus=1, serial_ports=list(SERIAL)))
    assert len(dsdt) < 512


# --- ACPICA's view ---------------------------------------------------------------------------
def run_tool(args: list[str], cwd: Path) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    return text


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if re.search(r"Error|Exception|Warning|mismatch", line)
            and not re.search(r"\b0 Errors\b", line)]


def disassemble(tmp_path: Path, sig: str, data: bytes) -> str:
    """``iasl -d`` one table; the .dsl text it wrote."""
    dat = tmp_path / f"{sig.lower()}.dat"
    dat.write_bytes(data)
    text = run_tool([str(IASL), "-d", dat.name], tmp_path)
    assert not error_lines(text), text
    return dat.with_suffix(".dsl").read_text()


@needs_iasl
@pytest.mark.parametrize("sig", SDT_SIGNATURES + ["FACS"])
def test_iasl_disassembles(tables: AcpiTables, tmp_path: Path, sig: str) -> None:
    dsl = disassemble(tmp_path, sig, tables.tables[sig][1])
    assert f'"{sig}"' in dsl


@needs_iasl
def test_iasl_decodes_fadt_and_madt(tables: AcpiTables, tmp_path: Path) -> None:
    fadt = disassemble(tmp_path, "FACP", tables.tables["FACP"][1])
    assert re.search(r"PM Timer Block Address : 00000608", fadt)
    assert re.search(r"32-bit PM Timer \(V1\) : 1", fadt)
    assert re.search(r"Control Method Power Button \(V1\) : 0", fadt)
    assert re.search(r"Reset Register Supported \(V2\) : 1", fadt)
    madt = disassemble(tmp_path, "APIC", tables.tables["APIC"][1])
    assert madt.count("[Processor Local APIC]") == 2
    assert "[I/O APIC]" in madt and "[Local APIC NMI]" in madt


@needs_iasl
def test_iasl_dsdt_roundtrip(tables: AcpiTables, tmp_path: Path) -> None:
    dsl = disassemble(tmp_path, "DSDT", tables.tables["DSDT"][1])
    for text in ['Name (\\_S5, Package (0x04)', 'Scope (\\_SB)',
                 'Device (COM1)', 'Device (COM2)', 'EisaId ("PNP0501")',
                 'Device (RTC)', 'EisaId ("PNP0B00")', 'Device (KBD)', 'EisaId ("PNP0303")',
                 'Device (MOU)', 'EisaId ("PNP0F13")', 'IRQNoFlags ()',
                 'Device (PCI0)', 'EisaId ("PNP0A08")', 'EisaId ("PNP0A03")', 'Name (_PRT',
                 'WordBusNumber (ResourceProducer', 'QWordMemory (ResourceProducer',
                 'Device (MRES)', 'EisaId ("PNP0C02")']:
        assert text in dsl, text
    # The ECAM window is claimed as a motherboard resource (Linux checks MCFG against it).
    assert re.search(r"Memory32Fixed \(ReadWrite,\s+0xE0000000,[^\n]*\n\s+0x10000000,", dsl), dsl
    assert "0x03F8,             // Range Minimum" in dsl
    text = run_tool([str(IASL), "dsdt.dsl"], tmp_path)
    assert not error_lines(text), text
    assert (tmp_path / "dsdt.aml").exists()


def every_builder_fragment() -> bytes:
    """A device using every AML builder, to let ACPICA check each encoding."""
    crs = aml.resource_template(
        aml.io(0x510, 12), aml.irq_no_flags(5), aml.irq(6, edge=False, active_low=True,
                                                       shared=True),
        aml.memory32_fixed(layout.HPET_BASE, 0x400), aml.word_bus_number(0, 0x7F),
        aml.word_io(0x1000, 0x1FFF), aml.dword_io(0x2000, 0x2FFF),
        aml.dword_memory(0xC000_0000, 0xC0FF_FFFF, cache=aml.MEM_WRITE_COMBINING),
        aml.qword_memory(1 << 40, (1 << 41) - 1, cache=aml.MEM_PREFETCHABLE),
        aml.interrupt(20, 21), checksum=True)
    return aml.device(
        "TST0",
        aml.name("_HID", aml.string("VMRN0001")),
        aml.name("_UID", aml.integer(0x1234_5678_9ABC)),
        aml.name("_CRS", crs),
        aml.name("BUF0", aml.buffer(b"\x01\x02\x03")),
        aml.name("BIG0", aml.package(*[aml.integer(i) for i in range(300)])),
        aml.method("_STA", 0, aml.return_(aml.integer(aml.STA_PRESENT_ENABLED))),
        aml.method("PING", 2, aml.notify("\\_SB.TST0", aml.integer(0x80)),
                   aml.return_(aml.arg(1)), serialized=True),
    )


@needs_iasl
def test_iasl_every_builder(platform: AcpiPlatform, tmp_path: Path) -> None:
    platform.dsdt_extra = [every_builder_fragment(),
                           aml.scope("\\_SB.TST0", aml.name("EXTR", aml.ONE))]
    dsl = disassemble(tmp_path, "DSDT", build_acpi(platform).tables["DSDT"][1])
    for text in ["IRQ (Level, ActiveLow, Shared, )", "Memory32Fixed (ReadWrite",
                 "WordIO (ResourceProducer", "DWordIO (ResourceProducer",
                 "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, WriteCombining",
                 "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Prefetchable",
                 "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive",
                 'Name (_HID, "VMRN0001")', "Name (_UID, 0x0000123456789ABC)",
                 "Package (0x012C)", "Method (PING, 2, Serialized)", "Notify (\\_SB.TST0, 0x80",
                 "Return (Arg1)", "Scope (\\_SB.TST0)"]:
        assert text in dsl, text
    text = run_tool([str(IASL), "dsdt.dsl"], tmp_path)
    assert not error_lines(text), text


@needs_acpiexec
def test_acpiexec_loads_and_evaluates(tables: AcpiTables, tmp_path: Path) -> None:
    """ACPICA, the interpreter Linux runs, loads the tables and evaluates the objects."""
    names = []
    for sig in ("DSDT", "FACP", "APIC", "MCFG"):
        names.append(f"{sig.lower()}.dat")
        (tmp_path / names[-1]).write_bytes(tables.tables[sig][1])
    commands = ["evaluate \\_S5", "resources \\_SB.COM1", "resources \\_SB.COM2",
                "resources \\_SB.RTC", "resources \\_SB.KBD", "resources \\_SB.MOU",
                "resources \\_SB.PCI0", "resources \\_SB.MRES", "evaluate \\_SB.PCI0._PRT"]
    text = run_tool([str(ACPIEXEC), "-b", "; ".join(commands), *names], tmp_path)
    assert "8 Devices" not in text and "7 Devices" in text
    assert "ACPI Error" not in text and "ACPI Warning" not in text, text
    assert "ACPI Exception" not in text and "mismatch" not in text, text
    assert "[Integer] = 0000000000000005" in text            # \_S5 SLP_TYP
    assert "Interrupt List : 4" in text and "Interrupt List : C" in text
    assert "Address Minimum : 03F8" in text
    assert "Address : E0000000" in text and "Address Length : 10000000" in text   # MRES


def test_ecam_allocation_matches_the_window_and_the_root_bridge() -> None:
    """MCFG, the PNP0C02 reservation and PCI0's bus range must agree (a last bus of 0 made
    Linux log "MMCONFIG ... only partially covers this bridge")."""
    base, segment, first, last = ecam_allocation()
    assert (base, segment, first) == (layout.ECAM_BASE, 0, 0)
    assert (last + 1) << 20 == layout.ECAM_SIZE and last == 255
    res = ecam_reservation_aml()
    assert struct.pack("<II", layout.ECAM_BASE, layout.ECAM_SIZE) in res
