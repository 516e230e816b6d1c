"""AHCI device logic against fake guest memory and the mock AHCI driver."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest
from vmrun_ahci.ata import AtaDisk
from vmrun_ahci.atapi import AtapiCd
from vmrun_ahci.hba import AhciHba

from vmrun.block import RawFile
from vmrun.core.msi import CAP_ID_MSI
from vmrun.testing import FakeVm, PciDriver
from vmrun.testing.ahci_driver import (
    CAP,
    CAP2,
    GHC,
    IS_DHRS,
    IS_HBFS,
    IS_IFS,
    IS_OFS,
    IS_PSS,
    IS_SDBS,
    IS_TFES,
    P_CI,
    P_CMD,
    P_IS,
    P_SACT,
    P_SIG,
    P_SSTS,
    P_TFD,
    PI,
    RX_PSFIS,
    RX_RFIS,
    RX_SDBFIS,
    VS,
    AhciDriver,
    h2d,
)

SLOT = 4
MiB = 1 << 20


def words(ident: bytes) -> list[int]:
    return list(struct.unpack("<256H", ident))


def text(ident: bytes, first: int, last: int) -> str:
    raw = ident[2 * first:2 * last + 2]
    return bytes(raw[i ^ 1] for i in range(len(raw))).decode().strip()


class Slow(RawFile):
    """A raw file whose reads at chosen offsets wait for an event (out-of-order tests)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.hold: dict[int, threading.Event] = {}
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []

    def readv(self, offset, bufs):
        ev = self.hold.get(offset)
        if ev is not None:
            ev.wait(5)
        return super().readv(offset, bufs)

    def flush(self):
        self.flushes += 1
        super().flush()

    def discard(self, offset, length):
        self.discards.append((offset, length))
        super().discard(offset, length)


@pytest.fixture
def vm():
    v = FakeVm(memory=32 * MiB)
    yield v
    assert v.loop.faults == []
    v.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    data = bytearray(4 * MiB)
    for s in range(len(data) // 512):
        struct.pack_into("<Q", data, s * 512, 0xD15C0000 + s)
    p.write_bytes(bytes(data))
    return p


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    p = tmp_path / "cd.iso"
    p.write_bytes(b"".join(struct.pack("<Q", 0xCD000000 + b).ljust(2048, b"\xcc")
                           for b in range(300)))
    return p


def controller(vm: FakeVm, *drives) -> tuple[AhciHba, AhciDriver]:
    hba = AhciHba(list(drives), workers=2)
    vm.pci.add(hba, SLOT)
    vm.pci.assign_bars()
    drv = AhciDriver(vm, SLOT)
    drv.reset()
    for p in range(len(drives)):
        drv.start(p)
    return hba, drv


def disk(image: Path, **kw) -> AtaDisk:
    return AtaDisk(RawFile(image, **kw), serial="SERIAL-1234")


# -- identity and registers ------------------------------------------------------------------
def test_pci_identity_abar_and_msi(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    pci = PciDriver(vm)
    assert pci.read(SLOT, 0, 0) == 0x2922_8086
    assert pci.read(SLOT, 0, 8) >> 8 == 0x010601
    assert pci.bar_size(SLOT, 0, 5) == 0x1000
    assert pci.read(SLOT, 0, 0x3D, 1) == 1                 # INTA#
    assert CAP_ID_MSI in {c for _, c in pci.capabilities(SLOT, 0)}


def test_hba_registers_and_port_signatures(vm: FakeVm, image: Path, iso: Path) -> None:
    hba, drv = controller(vm, disk(image), AtapiCd(RawFile(iso, read_only=True)))
    cap = drv.reg(CAP)
    assert cap & 0x1F == 1 and cap >> 8 & 0x1F == 31      # 2 ports, 32 slots
    assert cap & (1 << 31) and cap & (1 << 30) and cap & (1 << 18)   # 64-bit, NCQ, AHCI only
    assert cap >> 20 & 0xF == 3
    assert drv.reg(PI) == 0b11 and drv.reg(VS) == 0x00010300 and drv.reg(CAP2) == 0
    assert drv.reg(GHC) & (1 << 31)
    assert drv.preg(0, P_SIG) == 0x00000101 and drv.preg(1, P_SIG) == 0xEB140101
    assert drv.preg(0, P_SSTS) == 0x133
    assert drv.preg(0, P_TFD) & 0x88 == 0                  # not busy
    drv.set(CAP, 0)                                        # Linux writes CAP and PI back
    drv.set(PI, 0)
    assert drv.reg(PI) == 0b11 and drv.reg(CAP) == cap


def test_identify_device(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, AtaDisk(RawFile(image, sector_size=(512, 4096)),
                                      serial="SERIAL-1234"))
    ident = drv.identify(0)
    w = words(ident)
    assert text(ident, 27, 46) == "VMRUN SATA DISK"
    assert text(ident, 10, 19) == "SERIAL-1234"
    assert w[100] | w[101] << 16 == 8192                   # 4 MiB of 512-byte sectors
    assert w[60] | w[61] << 16 == 8192
    assert w[83] & (1 << 10) and w[86] & (1 << 10)         # LBA48
    assert w[76] & (1 << 8) and (w[75] & 0x1F) + 1 == 32   # NCQ, depth 32
    assert w[106] == 0x4000 | 0x2000 | 3                   # 8 logical sectors per physical
    assert w[169] & 1 and w[69] & (1 << 14)                # TRIM, deterministic
    assert w[82] & (1 << 5) and w[85] & (1 << 5)           # write cache, enabled
    assert w[93] == 0 and w[80] >= 0x20                    # a SATA device to libata
    assert sum(ident) & 0xFF == 0 and ident[510] == 0xA5   # checksum
    psfis = drv.fis(0, RX_PSFIS, 20)
    assert psfis[0] == 0x5F and psfis[15] == 0x50          # E_Status: DRDY | DSC
    assert drv.prdbc(0, 0) == 512


def test_identify_4k_logical_sectors(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image, sector_size=(4096, 4096)))
    w = words(drv.identify(0))
    assert w[100] == 1024
    assert w[106] & (1 << 12) and (w[117] | w[118] << 16) == 2048   # 2048 words


def test_intx_and_msi_interrupts(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    drv.identify(0)
    assert hba.intx.level is False or hba.intx.level is True
    buf = drv.alloc(512)
    drv.build(0, 0, h2d(0xEC), [(buf, 512)])
    drv.issue(0, 1)
    drv.vm.sync()
    assert drv.preg(0, P_CI) == 0
    assert drv.preg(0, P_IS) & IS_PSS and drv.reg(8) == 1
    assert hba.intx.level                                  # INTA# while IS is set
    drv.pset(0, P_IS, 0xFFFFFFFF)
    drv.set(8, 1)
    assert not hba.intx.level
    pci = PciDriver(vm)
    cap = {c: off for off, c in pci.capabilities(SLOT, 0)}[CAP_ID_MSI]
    pci.write(SLOT, 0, cap + 4, 4, 0xFEE00000)
    pci.write(SLOT, 0, cap + 12, 2, 0x41)
    pci.write(SLOT, 0, cap + 2, 2, 1)
    gsi = hba.irq.msi.gsis[0]
    vm.msi_count(gsi)
    drv.identify(0)
    assert vm.msi_count(gsi) == 1


# -- reads, writes, flush, trim --------------------------------------------------------------
@pytest.mark.parametrize("nocache", [False, True], ids=["threads", "aio"])
def test_dma_read_write_round_trip(vm: FakeVm, image: Path, nocache: bool) -> None:
    hba, drv = controller(vm, disk(image, nocache=nocache))
    r, data = drv.read(0, 10, 8)
    assert r.ok and r.is_ & IS_DHRS
    assert [struct.unpack_from("<Q", data, i * 512)[0] for i in range(8)] == \
        [0xD15C0000 + 10 + i for i in range(8)]
    assert drv.fis(0, RX_RFIS, 1)[0] == 0x34 and drv.prdbc(0, 0) == 4096
    payload = bytes(range(256)) * 16
    assert drv.write(0, 100, payload).ok
    assert image.read_bytes()[100 * 512:100 * 512 + 4096] == payload
    r, data = drv.read(0, 100, 8, command=0xC8)            # READ DMA (LBA28)
    assert r.ok and data == payload
    assert drv.write(0, 200, payload[:512], command=0xCA).ok
    assert image.read_bytes()[200 * 512:201 * 512] == payload[:512]


def test_scattered_prdt(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    bufs = [drv.alloc(1000, 2), drv.alloc(24, 2), drv.alloc(3072, 2)]
    r = drv.run(0, h2d(0x25, 0, 8), [(bufs[0], 1000), (bufs[1], 24), (bufs[2], 3072)])
    assert r.ok
    got = b"".join(vm.memory.read(b, n) for b, n in zip(bufs, (1000, 24, 3072), strict=True))
    assert got == image.read_bytes()[:4096]


def test_ncq_tags_in_flight_complete_out_of_order(vm: FakeVm, image: Path) -> None:
    backend = Slow(image)
    hba, drv = controller(vm, AtaDisk(backend))
    held = threading.Event()
    backend.hold[0] = held                                 # tag 0 waits
    bufs = {t: drv.alloc(4096) for t in range(8)}
    for t in range(8):
        drv.ncq(0, t, t * 8, 8, bufs[t])
    drv.issue(0, 0xFF, ncq=True)
    r = drv.wait(0, 0xFE, ncq=True)
    assert r.ok and r.is_ & IS_SDBS
    assert drv.preg(0, P_SACT) == 0x01                     # tag 0 still in flight
    assert drv.preg(0, P_CI) == 0                          # CI clears when the device takes it
    held.set()
    assert drv.wait(0, 0x01, ncq=True).ok
    sdb = drv.fis(0, RX_SDBFIS, 8)
    assert sdb[0] == 0xA1 and sdb[1] & 0x40 and not sdb[1] & 0x80
    assert struct.unpack_from("<I", sdb, 4)[0] & 1
    for t in range(8):
        data = vm.memory.read(bufs[t], 4096)
        assert struct.unpack_from("<Q", data)[0] == 0xD15C0000 + t * 8


def test_ncq_32_tags_writes(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image, nocache=True))
    for t in range(32):
        buf = drv.alloc(4096)
        vm.memory.write(buf, bytes([t]) * 4096)
        drv.ncq(0, t, 1000 + t * 8, 8, buf, write=True)
    drv.issue(0, 0xFFFFFFFF, ncq=True)
    assert drv.wait(0, 0xFFFFFFFF, ncq=True).ok
    raw = image.read_bytes()
    for t in range(32):
        assert raw[(1000 + t * 8) * 512:(1008 + t * 8) * 512] == bytes([t]) * 4096


def test_flush_and_write_cache(vm: FakeVm, image: Path) -> None:
    backend = Slow(image)
    hba, drv = controller(vm, AtaDisk(backend))
    assert drv.run(0, h2d(0xEA)).ok and backend.flushes == 1
    assert drv.run(0, h2d(0xE7)).ok and backend.flushes == 2
    assert drv.run(0, h2d(0xEF, features=0x82)).ok             # write cache off
    assert not words(drv.identify(0))[85] & (1 << 5)
    assert drv.write(0, 0, b"x" * 512).ok and backend.flushes == 3   # write-through
    assert drv.run(0, h2d(0xEF, features=0x02)).ok
    assert drv.write(0, 0, b"y" * 512).ok and backend.flushes == 3


def test_trim(vm: FakeVm, image: Path) -> None:
    backend = Slow(image)
    hba, drv = controller(vm, AtaDisk(backend))
    ranges = bytearray(512)
    struct.pack_into("<QQ", ranges, 0, 16 | 8 << 48, 64 | 16 << 48)
    buf = drv.alloc(512)
    vm.memory.write(buf, bytes(ranges))
    r = drv.run(0, h2d(0x06, count=1, features=1), [(buf, 512)], write=True)
    assert r.ok
    assert backend.discards == [(16 * 512, 8 * 512), (64 * 512, 16 * 512)]
    assert image.read_bytes()[16 * 512:24 * 512] == bytes(8 * 512)


def test_trim_refused_without_discard(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, AtaDisk(RawFile(image, discard=False)))
    assert not words(drv.identify(0))[169] & 1
    buf = drv.alloc(512)
    r = drv.run(0, h2d(0x06, count=1, features=1), [(buf, 512)], write=True)
    assert r.is_ & IS_TFES and r.error == 0x04


# -- errors ----------------------------------------------------------------------------------
def test_lba_past_the_end_is_a_task_file_error_then_restart(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    r, _ = drv.read(0, 8190, 8)
    assert r.is_ & IS_TFES and r.status & 1 and r.error == 0x10      # IDNF
    assert drv.preg(0, P_CI) == 1                          # the failed slot stays set
    buf = drv.alloc(512)
    drv.build(0, 1, h2d(0xEC), [(buf, 512)])
    drv.issue(0, 2)
    vm.sync()
    assert drv.preg(0, P_CI) == 3                          # stopped until ST is cleared
    drv.restart(0)
    assert drv.preg(0, P_CI) == 0
    assert drv.read(0, 0, 1)[0].ok


def test_write_to_read_only_disk_aborts(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image, read_only=True))
    r = drv.write(0, 0, b"z" * 512)
    assert r.is_ & IS_TFES and r.error == 0x04
    assert image.read_bytes()[:8] == struct.pack("<Q", 0xD15C0000)


def test_unknown_command_aborts(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    r = drv.run(0, h2d(0xB0))                              # SMART: not offered
    assert r.is_ & IS_TFES and r.error == 0x04 and drv.fis(0, RX_RFIS, 4)[3] == 0x04


def test_ncq_error_aborts_the_rest_and_log_10h_names_the_tag(vm: FakeVm, image: Path) -> None:
    backend = Slow(image)
    hba, drv = controller(vm, AtaDisk(backend))
    held = threading.Event()
    backend.hold[0] = held
    drv.ncq(0, 0, 0, 8, drv.alloc(4096))
    drv.ncq(0, 5, 8190, 8, drv.alloc(4096))                # past the end
    drv.issue(0, 1 | 1 << 5, ncq=True)
    r = drv.wait(0, 1 << 5, ncq=True)
    assert r.is_ & IS_TFES and r.is_ & IS_SDBS and r.status & 1
    assert drv.preg(0, P_SACT) == 1 | 1 << 5
    held.set()
    vm.sync()
    assert drv.preg(0, P_SACT) == 1 | 1 << 5               # tag 0 was aborted, not completed
    drv.restart(0)
    assert drv.preg(0, P_SACT) == 0
    buf = drv.alloc(512)
    assert drv.run(0, h2d(0x2F, lba=0x10, count=1), [(buf, 512)]).ok
    log = vm.memory.read(buf, 512)
    assert log[0] == 5 and log[2] & 1 and log[3] == 0x10 and sum(log) & 0xFF == 0
    assert drv.run(0, h2d(0x2F, lba=0x10, count=1), [(buf, 512)]).ok
    assert vm.memory.read(buf, 1)[0] & 0x80                # read once: no error left
    drv.ncq(0, 3, 0, 8, drv.alloc(4096))
    drv.issue(0, 1 << 3, ncq=True)
    assert drv.wait(0, 1 << 3, ncq=True).ok


def test_bad_addresses_are_host_bus_fatal(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    r = drv.run(0, h2d(0x25, 0, 8), [(0x7FFF_0000_0000, 4096)])
    assert r.is_ & IS_HBFS
    drv.restart(0)
    drv.build(0, 0, h2d(0x25, 0, 1), [(drv.alloc(512), 512)], ctba=0x40000000)
    drv.issue(0, 1)
    assert drv.wait(0, 1).is_ & IS_HBFS
    drv.restart(0)
    r = drv.run(0, h2d(0x25, 0, 8), [(drv.alloc(512), 512)])     # PRDT too short
    assert r.is_ & IS_OFS and r.is_ & IS_IFS
    drv.restart(0)
    drv.build(0, 0, h2d(0x25, 0, 1), [(drv.alloc(512), 512)], cfl=2)
    drv.issue(0, 1)
    assert drv.wait(0, 1).is_ & IS_IFS
    drv.restart(0)
    assert drv.read(0, 0, 1)[0].ok


def test_bus_mastering_off(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    pci = PciDriver(vm)
    pci.write(SLOT, 0, 4, 2, pci.read(SLOT, 0, 4, 2) & ~4)
    r = drv.run(0, h2d(0xEC), [(drv.alloc(512), 512)])
    assert r.is_ & IS_HBFS


def test_comreset_and_hba_reset_recover(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    drv.build(0, 0, h2d(0x25, 0, 1), [(drv.alloc(512), 512)], cfl=1)
    drv.issue(0, 1)
    drv.wait(0, 1)
    drv.comreset(0)
    assert drv.preg(0, P_SSTS) == 0x133 and drv.preg(0, P_SIG) == 0x101
    drv.start(0)
    assert drv.read(0, 0, 1)[0].ok
    drv.reset()
    assert drv.preg(0, P_CMD) & 1 == 0
    drv.start(0)
    assert drv.read(0, 1, 1)[0].ok


def test_soft_reset_gives_the_signature(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    drv.build(0, 0, h2d(0, control=0x04, c=False))
    drv.issue(0, 1)
    drv.wait(0, 1)
    assert drv.preg(0, P_TFD) & 0x80
    drv.build(0, 1, h2d(0, control=0, c=False))
    drv.issue(0, 2)
    drv.wait(0, 2)
    assert drv.preg(0, P_TFD) & 0xFF == 0x50 and drv.preg(0, P_SIG) == 0x101


# -- ATAPI -----------------------------------------------------------------------------------
def cd(iso: Path | None) -> AtapiCd:
    return AtapiCd(RawFile(iso, read_only=True) if iso else None, serial="CD-1")


def sense(drv: AhciDriver) -> tuple[int, int, int]:
    r, data = drv.packet(0, bytes((0x03, 0, 0, 0, 18)), 18)
    assert r.ok
    return data[2] & 0xF, data[12], data[13]


def test_atapi_identify_inquiry_capacity_and_reads(vm: FakeVm, iso: Path) -> None:
    hba, drv = controller(vm, cd(iso))
    ident = drv.identify(0, packet=True)
    w = words(ident)
    assert w[0] >> 14 == 2 and w[0] >> 8 & 0x1F == 5 and w[0] & 3 == 0
    assert text(ident, 27, 46) == "VMRUN SATA DVD-ROM"
    assert drv.run(0, h2d(0xEC), [(drv.alloc(512), 512)]).is_ & IS_TFES   # not an ATA disk
    drv.restart(0)
    assert drv.packet(0, bytes(12))[0].ok                  # TEST UNIT READY
    r, data = drv.packet(0, bytes((0x12, 0, 0, 0, 36)), 36)
    assert r.ok and data[0] == 5 and data[1] & 0x80 and data[8:13] == b"VMRUN"
    r, data = drv.packet(0, bytes((0x25,)), 8)
    assert struct.unpack(">II", data) == (299, 2048)
    for dma in (False, True):
        cdb = bytes((0x28, 0)) + struct.pack(">I", 7) + bytes((0,)) + struct.pack(">H", 3)
        r, data = drv.packet(0, cdb, 3 * 2048, dma=dma)
        assert r.ok and [struct.unpack_from("<Q", data, i * 2048)[0] for i in range(3)] == \
            [0xCD000007, 0xCD000008, 0xCD000009]
    cdb = bytes((0xA8, 0)) + struct.pack(">II", 299, 1)
    r, data = drv.packet(0, cdb, 2048)
    assert r.ok and struct.unpack_from("<Q", data)[0] == 0xCD000000 + 299


def test_atapi_toc_configuration_mode_sense_and_events(vm: FakeVm, iso: Path) -> None:
    hba, drv = controller(vm, cd(iso))
    r, toc = drv.packet(0, bytes((0x43, 0, 0, 0, 0, 0, 0, 0, 100)), 100)
    assert r.ok and toc[2:4] == b"\x01\x01"
    assert toc[6] == 1 and toc[14] == 0xAA and struct.unpack_from(">I", toc, 16)[0] == 300
    r, sess = drv.packet(0, bytes((0x43, 0, 1, 0, 0, 0, 0, 0, 12)), 12)
    assert r.ok and struct.unpack_from(">H", sess)[0] == 10 and sess[6] == 1
    r, old = drv.packet(0, bytes((0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40)), 12)   # SFF-8020
    assert r.ok and old == sess
    r, msf = drv.packet(0, bytes((0x43, 2, 0, 0, 0, 0, 0, 0, 100)), 100)
    assert msf[16:20] == bytes((0, 0, 6, 0))               # 300 + 150 frames: 00:06:00
    r, conf = drv.packet(0, bytes((0x46, 0, 0, 0, 0, 0, 0, 0, 200)), 200)
    assert r.ok and struct.unpack_from(">H", conf, 6)[0] == 0x0008   # CD-ROM profile
    r, ms = drv.packet(0, bytes((0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 64)), 64)
    assert r.ok and ms[8] == 0x2A
    r, ev = drv.packet(0, bytes((0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8)), 8)
    assert r.ok and ev[2] == 4 and ev[5] & 2               # media class, medium present


def test_atapi_eject_lock_and_medium_change(vm: FakeVm, iso: Path) -> None:
    hba, drv = controller(vm, cd(iso))
    assert drv.packet(0, bytes((0x1E, 0, 0, 0, 1)))[0].ok  # PREVENT
    r, _ = drv.packet(0, bytes((0x1B, 0, 0, 0, 2)))        # eject: refused
    assert r.is_ & IS_TFES and r.error >> 4 == 5
    drv.restart(0)
    assert sense(drv) == (5, 0x53, 0x02)
    assert drv.packet(0, bytes((0x1E, 0, 0, 0, 0)))[0].ok  # ALLOW
    assert drv.packet(0, bytes((0x1B, 0, 0, 0, 2)))[0].ok  # eject: tray open
    r, _ = drv.packet(0, bytes(12))
    assert r.is_ & IS_TFES and r.error >> 4 == 2
    drv.restart(0)
    assert sense(drv) == (2, 0x3A, 0x02)                   # no medium, tray open
    assert drv.packet(0, bytes((0x1B, 0, 0, 0, 3)))[0].ok  # load
    r, ev = drv.packet(0, bytes((0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8)), 8)
    assert ev[4] == 2                                      # new media
    r, _ = drv.packet(0, bytes(12))
    assert r.error >> 4 == 6                               # UNIT ATTENTION
    drv.restart(0)
    assert sense(drv) == (6, 0x28, 0x00)
    assert drv.packet(0, bytes(12))[0].ok


def test_empty_cd_drive(vm: FakeVm) -> None:
    hba, drv = controller(vm, cd(None))
    assert drv.preg(0, P_SIG) == 0xEB140101
    r, _ = drv.packet(0, bytes(12))
    assert r.is_ & IS_TFES and r.error >> 4 == 2
    drv.restart(0)
    assert sense(drv) == (2, 0x3A, 0x01)
    r, _ = drv.packet(0, bytes((0x25,)), 8)
    assert r.is_ & IS_TFES
    drv.restart(0)
    r, data = drv.packet(0, bytes((0x12, 0, 0, 0, 36)), 36)
    assert r.ok and data[0] == 5


def test_atapi_read_past_the_end_and_bad_opcode(vm: FakeVm, iso: Path) -> None:
    hba, drv = controller(vm, cd(iso))
    cdb = bytes((0x28, 0)) + struct.pack(">I", 299) + bytes((0,)) + struct.pack(">H", 2)
    r, _ = drv.packet(0, cdb, 4096)
    assert r.is_ & IS_TFES and r.error >> 4 == 5
    drv.restart(0)
    assert sense(drv) == (5, 0x21, 0x00)
    r, _ = drv.packet(0, bytes((0xFF,)))
    assert r.error >> 4 == 5
    drv.restart(0)
    assert sense(drv) == (5, 0x20, 0x00)


def test_several_ports_work_independently(vm: FakeVm, image: Path, iso: Path,
                                          tmp_path: Path) -> None:
    other = tmp_path / "b.img"
    other.write_bytes(b"\x42" * MiB)
    hba, drv = controller(vm, disk(image), cd(iso), disk(other))
    assert drv.reg(PI) == 0b111
    assert drv.read(2, 0, 1)[1] == b"\x42" * 512
    assert drv.packet(1, bytes((0x25,)), 8)[0].ok
    assert drv.read(0, 0, 1)[0].ok
    assert drv.preg(1, P_IS) == 0 and drv.preg(2, P_IS) == 0


def test_stop_waits_for_the_io_in_flight(vm: FakeVm, image: Path) -> None:
    """PxCMD.ST cleared with NCQ reads in flight: when CR reads 0 no DMA is left, and the
    late completions change nothing."""
    backend = Slow(image)
    hba, drv = controller(vm, AtaDisk(backend))
    held = threading.Event()
    backend.hold[0] = held
    buf = drv.alloc(4096)
    vm.memory.write(buf, b"\xee" * 4096)
    drv.ncq(0, 0, 0, 8, buf)
    drv.issue(0, 1, ncq=True)
    vm.sync()
    threading.Timer(0.2, held.set).start()
    drv.stop(0)                                            # waits for the read
    assert struct.unpack_from("<Q", vm.memory.read(buf, 8))[0] == 0xD15C0000
    vm.sync()
    assert drv.preg(0, P_SACT) == 0 and drv.preg(0, P_IS) & IS_SDBS == 0


def test_an_internal_error_stops_the_controller_until_reset(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    hba.fault("simulated")
    r = drv.run(0, h2d(0xEC), [(drv.alloc(512), 512)])
    assert r.is_ & IS_HBFS
    drv.reset()
    drv.start(0)
    assert drv.identify(0)[510] == 0xA5


def test_byte_and_qword_register_access(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    base = drv.abar + 0x100
    assert vm.mmio.read(base + 0x24, 1) == 0x01            # PxSIG, byte by byte
    assert vm.mmio.read(base + 0x25, 1) == 0x01
    assert vm.mmio.read(drv.abar + 0x10, 2) == 0x0300      # VS low half
    vm.mmio.write(base + 0x14, 1, 0xFF)                    # PxIE low byte only
    assert drv.preg(0, 0x14) & 0xFF == 0xFF
    vm.mmio.write(base + 0x00, 8, 0x12_3456_7800)          # PxCLB + PxCLBU at once
    assert drv.preg(0, 0x00) == 0x3456_7800 - 0x3456_7800 % 1024 and drv.preg(0, 0x04) == 0x12


def test_pio_reads_and_no_data_commands(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    r, data = drv.read(0, 3, 2, command=0x24)              # READ SECTORS EXT (PIO)
    assert r.ok and r.is_ & IS_PSS and struct.unpack_from("<Q", data)[0] == 0xD15C0003
    r, data = drv.read(0, 4, 1, command=0x20)              # READ SECTORS (LBA28)
    assert r.ok and struct.unpack_from("<Q", data)[0] == 0xD15C0004
    assert drv.write(0, 300, b"p" * 512, command=0x34).ok  # WRITE SECTORS EXT
    assert image.read_bytes()[300 * 512:301 * 512] == b"p" * 512
    assert drv.run(0, h2d(0x42, 0, 8)).ok                  # READ VERIFY EXT
    assert drv.run(0, h2d(0x42, 8190, 8)).is_ & IS_TFES
    drv.restart(0)
    r = drv.run(0, h2d(0xE5))                              # CHECK POWER MODE: active
    assert r.ok and drv.fis(0, RX_RFIS, 14)[12] == 0xFF
    for command in (0xE0, 0xE1, 0xC6, 0x91):               # standby, idle, multiple, ...
        assert drv.run(0, h2d(command)).ok
    assert drv.run(0, h2d(0xEF, count=0x46, features=0x03)).ok      # UDMA6
    assert words(drv.identify(0))[88] >> 8 == 1 << 6
    assert drv.run(0, h2d(0xEF, count=0x30, features=0x03)).is_ & IS_TFES   # bogus mode
    drv.restart(0)
    assert drv.run(0, h2d(0xEF, features=0x99)).is_ & IS_TFES
    drv.restart(0)


def test_read_log_directory_and_bad_pages(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    buf = drv.alloc(512)
    assert drv.run(0, h2d(0x2F, lba=0, count=1), [(buf, 512)]).ok
    d = vm.memory.read(buf, 512)
    assert struct.unpack_from("<H", d)[0] == 1 and struct.unpack_from("<H", d, 0x20)[0] == 1
    assert struct.unpack_from("<H", d, 0x60)[0] == 0       # no IDENTIFY DEVICE data log
    for lba, count in ((0x30, 1), (0x10 | 1 << 8, 1), (0x10, 2)):
        assert drv.run(0, h2d(0x2F, lba=lba, count=count), [(buf, 1024)]).is_ & IS_TFES
        drv.restart(0)
    assert drv.run(0, h2d(0x47, lba=0x10, count=1), [(buf, 512)]).ok   # READ LOG DMA EXT


def test_trim_payload_bounds(vm: FakeVm, image: Path) -> None:
    hba, drv = controller(vm, disk(image))
    buf = drv.alloc(512 * 9)
    for count in (0, 9):                                   # no blocks, more than 8
        r = drv.run(0, h2d(0x06, count=count, features=1), [(buf, 512 * 9)], write=True)
        assert r.is_ & IS_TFES
        drv.restart(0)
    vm.memory.write(buf, struct.pack("<Q", 8190 | 8 << 48).ljust(512, b"\0"))
    r = drv.run(0, h2d(0x06, count=1, features=1), [(buf, 512)], write=True)
    assert r.is_ & IS_TFES and r.error == 0x10             # range past the end
    drv.restart(0)
    vm.memory.write(buf, bytes(512))                       # only empty ranges: nothing to do
    assert drv.run(0, h2d(0x06, count=1, features=1), [(buf, 512)], write=True).ok


def test_atapi_more_commands(vm: FakeVm, iso: Path) -> None:
    hba, drv = controller(vm, cd(iso))
    cdb = bytes((0xBE, 0)) + struct.pack(">I", 5) + (2).to_bytes(3, "big") + bytes((0x10,))
    r, data = drv.packet(0, cdb, 4096)                     # READ CD, user data
    assert r.ok and struct.unpack_from("<Q", data, 2048)[0] == 0xCD000006
    r, _ = drv.packet(0, cdb[:9] + bytes((0xF8,)), 4096)   # raw sectors: not offered
    assert r.is_ & IS_TFES
    drv.restart(0)
    r, ms = drv.packet(0, bytes((0x1A, 0, 0x3F, 0, 64)), 64)   # MODE SENSE(6), all pages
    assert r.ok and ms[0] == len(ms[:ms[0] + 1]) - 1 and ms[4] == 0x01
    r, di = drv.packet(0, bytes((0x51, 0, 0, 0, 0, 0, 0, 0, 34)), 34)
    assert r.ok and di[2] == 0x0E
    r, vpd = drv.packet(0, bytes((0x12, 1, 0, 0, 64)), 64)
    assert r.ok and vpd[1] == 0 and list(vpd[4:7]) == [0, 0x80, 0x83]
    r, vpd = drv.packet(0, bytes((0x12, 1, 0x80, 0, 64)), 64)
    assert r.ok and vpd[4:4 + vpd[3]] == b"CD-1"
    r, _ = drv.packet(0, bytes((0x12, 1, 0xB0, 0, 64)), 64)
    assert r.is_ & IS_TFES
    drv.restart(0)
    assert drv.packet(0, bytes((0x2B, 0)) + struct.pack(">I", 10))[0].ok   # SEEK
    r, gesn = drv.packet(0, bytes((0x4A, 0, 0, 0, 0x10, 0, 0, 0, 8)), 8)   # async: refused
    assert r.is_ & IS_TFES
    drv.restart(0)
    r, conf = drv.packet(0, bytes((0x46, 2, 0, 0x10, 0, 0, 0, 0, 64)), 64)  # one feature
    assert r.ok and struct.unpack_from(">H", conf, 8)[0] == 0x0010
    assert struct.unpack_from(">I", conf)[0] == 4 + 12


# -- snapshots -------------------------------------------------------------------------------
def moved(vm: FakeVm, drv: AhciDriver, drives) -> tuple[FakeVm, AhciHba]:
    """The state of ``vm``'s controller (through JSON) in a fresh controller with the
    drives ``drives()`` opens (the same images: the old controller lets go of them first)
    on a copy of the RAM; ``drv`` goes on with it, unaware of the move."""
    import json

    state = json.loads(json.dumps(vm.pci.save_state()))
    vm.pci.devices[(SLOT, 0)].close()
    b = FakeVm(memory=vm.memory.size)
    b.memory.write(0, vm.memory.read(0, vm.memory.size))
    hba = AhciHba(drives(), workers=2)
    b.pci.add(hba, SLOT)
    b.pci.assign_bars()
    b.pci.load_state(state)
    b.sync()
    drv.vm, drv.pci = b, PciDriver(b)
    return b, hba


def test_snapshot_drains_ncq_flushes_and_the_port_goes_on(vm: FakeVm, image: Path) -> None:
    """An NCQ command in flight when the snapshot is taken finishes first (its data and
    Set Device Bits FIS are in the saved RAM); the image is flushed; a fresh controller on
    the same image takes the next command on the same port, with the write cache still
    off as the driver set it."""
    backend = Slow(image)
    hba, drv = controller(vm, AtaDisk(backend))
    assert drv.run(0, h2d(0xEF, features=0x82)).ok             # write cache off
    assert drv.write(0, 10, b"s" * 512).ok
    held = threading.Event()
    backend.hold[0] = held
    bufs = {t: drv.alloc(4096) for t in range(4)}
    for t in range(4):
        drv.ncq(0, t, t * 8, 8, bufs[t])
    drv.issue(0, 0xF, ncq=True)
    drv.wait(0, 0xE, ncq=True)
    assert drv.preg(0, P_SACT) == 0x01
    flushes = backend.flushes
    threading.Timer(0.2, held.set).start()
    b, hba2 = moved(vm, drv, lambda: [AtaDisk(RawFile(image))])
    try:
        assert backend.flushes == flushes + 1
        assert drv.preg(0, P_SACT) == 0 and drv.preg(0, P_CMD) & 1      # ST still on
        assert struct.unpack_from("<Q", b.memory.read(bufs[0], 8))[0] == 0xD15C0000
        assert struct.unpack_from("<I", drv.fis(0, RX_SDBFIS, 8), 4)[0] & 1
        r, data = drv.read(0, 10, 1)
        assert r.ok and data == b"s" * 512
        assert not words(drv.identify(0))[85] & (1 << 5)
    finally:
        b.close()


def test_snapshot_keeps_the_cd_tray_lock_and_media_event(vm: FakeVm, iso: Path) -> None:
    hba, drv = controller(vm, cd(iso))
    assert drv.packet(0, bytes((0x1B, 0, 0, 0, 2)))[0].ok  # eject: tray open
    assert drv.packet(0, bytes((0x1E, 0, 0, 0, 1)))[0].ok  # PREVENT
    b, _ = moved(vm, drv, lambda: [cd(iso)])
    try:
        r, _ = drv.packet(0, bytes(12))                    # no medium: the tray is open
        assert r.is_ & IS_TFES and r.error >> 4 == 2
        drv.restart(0)
        assert drv.packet(0, bytes((0x1B, 0, 0, 0, 3)))[0].ok  # load
        r, ev = drv.packet(0, bytes((0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8)), 8)
        assert ev[4] == 2                                  # new media
        r, _ = drv.packet(0, bytes(12))
        assert r.error >> 4 == 6                           # UNIT ATTENTION
        drv.restart(0)
        r, _ = drv.packet(0, bytes((0x1B, 0, 0, 0, 2)))    # eject: refused, still locked
        assert r.is_ & IS_TFES and r.error >> 4 == 5
    finally:
        b.close()


def test_snapshot_of_an_empty_cd_drive(vm: FakeVm, iso: Path) -> None:
    """An ahci-cd without media (the shared e2e boot's) saves and restores: its queue is
    the no-medium stand-in, drained like a real one (it raised TypeError before)."""
    hba, drv = controller(vm, cd(None))
    b, _ = moved(vm, drv, lambda: [cd(None)])
    try:
        r, _ = drv.packet(0, bytes(12))                    # TEST UNIT READY: no medium
        assert r.is_ & IS_TFES and r.error >> 4 == 2
    finally:
        b.close()


def test_a_state_of_another_version_is_refused(vm: FakeVm, image: Path) -> None:
    hba, _ = controller(vm, disk(image))
    state = hba.device_state()
    state["version"] = 7
    with pytest.raises(ValueError, match="ahci: state version 7, this vmrun has 1"):
        hba.load_device_state(state)
