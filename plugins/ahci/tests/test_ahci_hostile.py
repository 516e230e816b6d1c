"""A hostile AHCI driver: command headers, FISes, CDBs, PRDTs and register writes made up by
hypothesis, mixed with a real driver's steps. Nothing may escape to the vCPU or the event
loop (no faults), every command ends (done or an error bit, never stuck in PxCI while the
port runs), and a controller reset always brings back a working disk and CD."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrun_ahci.ata import AtaDisk
from vmrun_ahci.atapi import AtapiCd
from vmrun_ahci.hba import MAX_PRDT, AhciHba

from vmrun.block import RawFile
from vmrun.testing import FakeVm
from vmrun.testing.ahci_driver import (
    GHC,
    IS,
    P_CI,
    P_CLB,
    P_CMD,
    P_FB,
    P_IE,
    P_IS,
    P_SACT,
    P_SCTL,
    P_SERR,
    AhciDriver,
    h2d,
)

SLOT = 3
RAM = 16 << 20
SCALE = int(os.environ.get("VMRUN_FUZZ_SCALE", "10")) if os.environ.get("VMRUN_FUZZ") else 1
COMMANDS = (0x25, 0x35, 0xC8, 0xCA, 0x60, 0x61, 0xEC, 0xA1, 0xA0, 0x06, 0xEF, 0x2F, 0x47,
            0xE7, 0xEA, 0x20, 0x30, 0x42, 0x00, 0x08, 0xE5)
CDB_OPS = (0x00, 0x03, 0x12, 0x1B, 0x1E, 0x25, 0x28, 0xA8, 0xBE, 0x2B, 0x1A, 0x5A, 0x43, 0x46,
           0x4A, 0x51, 0xBB)

addresses = st.one_of(st.integers(0, RAM - 1), st.integers(0, 1 << 64 - 1),
                      st.sampled_from([0, RAM - 16, RAM, 0xFFFFFFFF, 1 << 40]))
prd = st.tuples(addresses, st.integers(1, 1 << 22))
fis = st.builds(
    lambda c, lba, count, feat, dev, raw, junk: (h2d(c, lba, count, feat, dev) if not junk
                                                 else raw),
    st.one_of(st.sampled_from(COMMANDS), st.integers(0, 255)), st.integers(0, (1 << 48) - 1),
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 255),
    st.binary(min_size=0, max_size=64), st.booleans())
cdb = st.builds(lambda op, rest: bytes((op,)) + rest,
                st.one_of(st.sampled_from(CDB_OPS), st.integers(0, 255)),
                st.binary(min_size=11, max_size=15))

command = st.fixed_dictionaries({
    "slot": st.integers(0, 31), "fis": fis, "prdt": st.lists(prd, max_size=6),
    "cdb": st.one_of(st.just(b""), cdb), "write": st.booleans(),
    "cfl": st.one_of(st.none(), st.integers(0, 31)),
    "prdtl": st.one_of(st.none(), st.integers(0, 0xFFFF)),
    "ctba": st.one_of(st.none(), addresses)})
register = st.tuples(st.sampled_from([P_CI, P_SACT, P_CMD, P_IS, P_IE, P_SCTL, P_SERR, P_CLB,
                                      P_FB, 0x04, 0x7C]),
                     st.integers(0, 0xFFFFFFFF))
step = st.one_of(
    st.tuples(st.just("cmd"), st.integers(0, 1), command),
    st.tuples(st.just("issue"), st.integers(0, 1), st.integers(0, 0xFFFFFFFF), st.booleans()),
    st.tuples(st.just("reg"), st.integers(0, 1), register),
    st.tuples(st.just("hba"), st.sampled_from([GHC, IS, 0x00, 0x0C]),
              st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("restart"), st.integers(0, 1)),
    st.tuples(st.just("busmaster"), st.booleans()),
)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("hostile")
    (d / "disk.img").write_bytes(bytes(range(256)) * 4096)       # 1 MiB
    (d / "cd.iso").write_bytes(b"\x11" * 2048 * 64)
    return d / "disk.img", d / "cd.iso"


def _apply(vm: FakeVm, drv: AhciDriver, s: tuple) -> None:
    kind = s[0]
    if kind == "cmd":
        _, port, c = s
        drv.build(port, c["slot"], c["fis"], c["prdt"], write=c["write"], cdb=c["cdb"],
                  cfl=c["cfl"], prdtl=c["prdtl"], ctba=c["ctba"])
    elif kind == "issue":
        drv.issue(s[1], s[2], ncq=s[3])
    elif kind == "reg":
        drv.pset(s[1], *s[2])
    elif kind == "hba":
        drv.set(s[1], s[2])
    elif kind == "restart":
        drv.restart(s[1])
    elif kind == "busmaster":
        cmd = drv.pci.read(SLOT, 0, 4, 2)
        drv.pci.write(SLOT, 0, 4, 2, cmd | 4 if s[1] else cmd & ~4)


@settings(max_examples=120 * SCALE, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=12 * SCALE))
def test_hostile_driver_never_breaks_the_vmm(images, steps) -> None:
    disk, iso = images
    vm = FakeVm(memory=RAM)
    hba = AhciHba([AtaDisk(RawFile(disk)), AtapiCd(RawFile(iso, read_only=True))], workers=2)
    vm.pci.add(hba, SLOT)
    vm.pci.assign_bars()
    try:
        drv = AhciDriver(vm, SLOT)
        drv.reset()
        drv.start(0)
        drv.start(1)
        for s in steps:
            _apply(vm, drv, s)
        vm.sync()
        for p in hba.ports:               # drain what is in flight, then nothing may be stuck
            if p.io is not None:
                p.io.drain()
        vm.sync()
        vm.sync()
        assert vm.loop.faults == []
        for p in hba.ports:               # a running port has nothing stuck
            if p.cmd & 1 and not p.halted and not p.drive.atapi:
                assert not p.nonq_busy and not p.ncq_busy and not p.ci & ~p.started, \
                    (hex(p.ci), hex(p.started), p.nonq_busy, hex(p.ncq_busy))
        # recovery: bus mastering on, a controller reset, and both drives answer
        drv.pci.write(SLOT, 0, 4, 2, drv.pci.read(SLOT, 0, 4, 2) | 6)
        drv.reset()
        drv.start(0)
        drv.start(1)
        r, data = drv.read(0, 2, 1)
        assert r.ok and data == (bytes(range(256)) * 2)[:512]
        r, data = drv.packet(1, bytes((0x25,)), 8)
        if not r.ok:                      # a unit attention left over from a tray close
            drv.restart(1)
            r, data = drv.packet(1, bytes((0x25,)), 8)
        if not r.ok:                      # the hostile steps left the tray open
            drv.restart(1)
            assert drv.packet(1, bytes((0x1E, 0, 0, 0, 0)))[0].ok
            assert drv.packet(1, bytes((0x1B, 0, 0, 0, 3)))[0].ok
            drv.restart(1)
            drv.packet(1, bytes(12))
            drv.restart(1)
            r, data = drv.packet(1, bytes((0x25,)), 8)
        assert r.ok and struct.unpack(">II", data) == (63, 2048)
        assert vm.loop.faults == []
    finally:
        vm.close()


def test_prdt_length_is_bounded(images) -> None:
    """A PRDT longer than MAX_PRDT entries is refused before a byte of it is read."""
    disk, iso = images
    vm = FakeVm(memory=RAM)
    hba = AhciHba([AtaDisk(RawFile(disk))], workers=1)
    vm.pci.add(hba, SLOT)
    vm.pci.assign_bars()
    try:
        drv = AhciDriver(vm, SLOT)
        drv.reset()
        drv.start(0)
        drv.build(0, 0, h2d(0x25, 0, 1), [(drv.alloc(512), 512)], prdtl=MAX_PRDT + 1)
        drv.issue(0, 1)
        r = drv.wait(0, 1)
        assert r.is_ & (1 << 27) and not r.ok
        drv.restart(0)
        assert drv.read(0, 0, 1)[0].ok
    finally:
        vm.close()

