"""virtio-blk device logic against fake guest memory and the mock virtio driver."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrun_virtio_blk.device import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlk,
)

from vmrun.block import RawFile, SparseSplitDisk
from vmrun.core.virtio.device import STATUS_DEVICE_NEEDS_RESET
from vmrun.core.virtio.pci import VirtioPciTransport
from vmrun.core.virtio.queue import VIRTQ_DESC_F_NEXT
from vmrun.testing import FakeVm, VirtioDriver

SLOT = 4


class Disk:
    def __init__(self, vm: FakeVm, backend, serial: str = "") -> None:
        self.vm = vm
        self.transport = VirtioPciTransport(VirtioBlk(backend, serial=serial, workers=2))
        vm.pci.add(self.transport, SLOT)
        vm.pci.assign_bars()
        self.drv = VirtioDriver(vm, SLOT)
        self.features = self.drv.setup()
        self.q = self.drv.queues[0]

    def request(self, rtype: int, sector: int, data: bytes = b"", read_len: int = 0,
                indirect: bool = False, align: int = 16) -> tuple[int, bytes, int]:
        """(status, data read, used length)."""
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        readable = [hdr] + ([data] if data else [])
        writable = ([read_len] if read_len else []) + [1]
        head, bufs = self.q.add(readable, writable, indirect=indirect, align=align)
        self.drv.kick(0)
        used = self._wait(head)
        status = self.vm.memory.read(bufs[-1], 1)[0]
        got = self.vm.memory.read(bufs[0], read_len) if read_len else b""
        return status, got, used

    def _wait(self, head: int) -> int:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            for h, n in self.q.get_used():
                if h == head:
                    return n
            time.sleep(0.001)
        raise AssertionError("request not completed")

    def config(self, offset: int, size: int) -> int:
        return self.drv.device_config(offset, size)


@pytest.fixture
def vm():
    v = FakeVm(memory=8 << 20)
    yield v
    v.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * 4096 + b"\x07" * 300)   # 1 MiB + an odd tail
    return p


def test_capacity_geometry_and_features(vm: FakeVm, image: Path) -> None:
    d = Disk(vm, RawFile(image, sector_size=(512, 4096)))
    assert d.config(0, 8) == (1 << 20) // 512           # the odd tail is not a whole sector
    assert d.config(20, 4) == 512                        # blk_size
    assert d.config(24, 1) == 3                          # physical block exponent: 4096/512
    assert not d.features & VIRTIO_BLK_F_RO
    assert d.features & VIRTIO_BLK_F_DISCARD


def test_read_write_round_trip(vm: FakeVm, image: Path) -> None:
    d = Disk(vm, RawFile(image))
    status, data, used = d.request(VIRTIO_BLK_T_IN, 2, read_len=1024)
    assert status == VIRTIO_BLK_S_OK and used == 1025
    assert data == (bytes(range(256)) * 8)[1024:2048]
    payload = bytes(range(255, -1, -1)) * 4
    assert d.request(VIRTIO_BLK_T_OUT, 10, data=payload)[0] == VIRTIO_BLK_S_OK
    assert d.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes()[5120:6144] == payload
    status, data, _ = d.request(VIRTIO_BLK_T_IN, 10, read_len=1024, indirect=True)
    assert data == payload


def test_nocache_uses_native_aio_when_aligned(vm: FakeVm, image: Path) -> None:
    """O_DIRECT reads and writes with aligned buffers go through io_submit; unaligned ones
    (and flushes) through the worker threads; both give the same results."""
    d = Disk(vm, RawFile(image, nocache=True))
    dev = d.transport.device
    assert dev.io.aio is not None
    payload = bytes(range(256)) * 16                         # 4 KiB
    assert d.request(VIRTIO_BLK_T_OUT, 8, data=payload[::-1], align=4096)[0] == VIRTIO_BLK_S_OK
    assert dev.aio_requests == 1
    status, data, used = d.request(VIRTIO_BLK_T_IN, 8, read_len=4096, align=4096)
    assert (status, used, data) == (VIRTIO_BLK_S_OK, 4097, payload[::-1])
    assert dev.aio_requests == 2
    status, data, _ = d.request(VIRTIO_BLK_T_IN, 8, read_len=512)   # 16-byte aligned buffer
    assert status == VIRTIO_BLK_S_OK and data == payload[::-1][:512]
    assert dev.aio_requests == 2
    assert d.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    # Past the end and read-only writes still get their error status (from the threads).
    assert d.request(VIRTIO_BLK_T_IN, 2048, read_len=4096, align=4096)[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes()[4096:8192] == payload[::-1]


def test_out_of_range_and_partial_sectors_fail(vm: FakeVm, image: Path) -> None:
    d = Disk(vm, RawFile(image))
    assert d.request(VIRTIO_BLK_T_IN, 2048, read_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_IN, 2047, read_len=1024)[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_IN, 0, read_len=100)[0] == VIRTIO_BLK_S_IOERR
    assert d.request(99, 0)[0] == VIRTIO_BLK_S_UNSUPP
    assert d.request(VIRTIO_BLK_T_IN, 2047, read_len=512)[0] == VIRTIO_BLK_S_OK


def test_read_only_rejects_writes(vm: FakeVm, image: Path) -> None:
    d = Disk(vm, RawFile(image, read_only=True))
    assert d.features & VIRTIO_BLK_F_RO
    before = image.read_bytes()
    assert d.request(VIRTIO_BLK_T_OUT, 0, data=b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_IN, 0, read_len=512)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes() == before


def test_get_id(vm: FakeVm, image: Path) -> None:
    d = Disk(vm, RawFile(image), serial="vmrun-disk-0")
    status, data, used = d.request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)
    assert status == VIRTIO_BLK_S_OK and data == b"vmrun-disk-0".ljust(20, b"\0")


def test_discard_and_write_zeroes(vm: FakeVm, tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\xab" * (1 << 20))
    d = Disk(vm, RawFile(img))
    seg = struct.pack("<QII", 8, 16, 0)
    assert d.request(VIRTIO_BLK_T_DISCARD, 0, data=seg)[0] == VIRTIO_BLK_S_OK
    assert d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, data=struct.pack("<QII", 100, 1, 0))[0] == \
        VIRTIO_BLK_S_OK
    data = img.read_bytes()
    assert data[8 * 512:24 * 512] == bytes(16 * 512)
    assert data[100 * 512:101 * 512] == bytes(512)
    assert data[:8 * 512] == b"\xab" * 8 * 512
    bad = struct.pack("<QII", 2040, 100, 0)
    assert d.request(VIRTIO_BLK_T_DISCARD, 0, data=bad)[0] == VIRTIO_BLK_S_IOERR


def test_sparse_split_backend(vm: FakeVm, tmp_path: Path) -> None:
    base = tmp_path / "sp.img"
    disk = SparseSplitDisk(base, size=4 << 20, split=1 << 20, sparse=True)
    d = Disk(vm, disk)
    payload = b"\x5a" * 4096
    # 1 MiB boundary at sector 2048: a write spanning two segment files
    assert d.request(VIRTIO_BLK_T_OUT, 2044, data=payload)[0] == VIRTIO_BLK_S_OK
    assert d.request(VIRTIO_BLK_T_OUT, 0, data=bytes(4096))[0] == VIRTIO_BLK_S_OK   # zeros
    status, data, _ = d.request(VIRTIO_BLK_T_IN, 2040, read_len=8192)
    assert data == bytes(2048) + payload + bytes(2048)
    assert (tmp_path / "sp.img.0000").stat().st_size == 2048
    assert (tmp_path / "sp.img.0001").stat().st_size == 2048


def test_chain_without_status_marks_device_broken(vm: FakeVm, image: Path) -> None:
    d = Disk(vm, RawFile(image))
    hdr_addr = d.drv.alloc.alloc(16)
    vm.memory.write(hdr_addr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    d.q.write_desc(0, hdr_addr, 16, 0, 0)     # header only: no writable status byte
    d.q.publish(0)
    d.drv.kick(0)
    end = time.monotonic() + 5
    while not d.drv.status & STATUS_DEVICE_NEEDS_RESET and time.monotonic() < end:
        time.sleep(0.001)
    assert d.drv.status & STATUS_DEVICE_NEEDS_RESET


def test_loop_in_chain_marks_device_broken(vm: FakeVm, image: Path) -> None:
    d = Disk(vm, RawFile(image))
    d.q.write_desc(0, 0x200000, 16, VIRTQ_DESC_F_NEXT, 1)
    d.q.write_desc(1, 0x200000, 16, VIRTQ_DESC_F_NEXT, 0)
    d.q.publish(0)
    d.drv.kick(0)
    assert d.drv.status & STATUS_DEVICE_NEEDS_RESET


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 2047),
                              st.integers(1, 8)), min_size=1, max_size=12))
def test_random_requests_match_a_model(tmp_path_factory, ops) -> None:
    vm = FakeVm(memory=8 << 20)
    try:
        img = tmp_path_factory.mktemp("m") / "m.img"
        img.write_bytes(bytes(1 << 20))
        model = bytearray(1 << 20)
        d = Disk(vm, RawFile(img))
        for i, (op, sector, count) in enumerate(ops):
            n = count * 512
            in_range = (sector + count) * 512 <= len(model)
            if op == "w":
                data = bytes([(i * 7 + 1) & 0xFF]) * n
                status = d.request(VIRTIO_BLK_T_OUT, sector, data=data)[0]
                if in_range:
                    model[sector * 512:sector * 512 + n] = data
            else:
                status, data, _ = d.request(VIRTIO_BLK_T_IN, sector, read_len=n)
                if in_range:
                    assert data == model[sector * 512:sector * 512 + n]
            assert status == (VIRTIO_BLK_S_OK if in_range else VIRTIO_BLK_S_IOERR)
    finally:
        vm.close()


class SlowDisk(RawFile):
    """A raw file whose reads take a while, to have requests in flight at a reset."""

    def readv(self, offset, bufs):
        time.sleep(0.2)
        return super().readv(offset, bufs)


def test_reset_drains_requests_in_flight(vm: FakeVm, image: Path) -> None:
    d = Disk(vm, SlowDisk(image))
    for i in range(4):
        hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i)
        d.q.add([hdr], [512, 1])
    d.drv.kick(0)
    time.sleep(0.05)                                    # the workers have them now
    start = time.monotonic()
    d.drv.common_write(0x14, 1, 0)                      # reset while 4 reads are running
    assert time.monotonic() - start >= 0.1              # it waited for them
    assert d.transport.device.io.inflight == 0
    d.drv.setup()                                       # new rings: nothing old lands there
    d.q = d.drv.queues[0]
    time.sleep(0.3)
    assert d.q.used_idx() == 0
    status, data, _ = d.request(VIRTIO_BLK_T_IN, 0, read_len=512)
    assert status == VIRTIO_BLK_S_OK and data == bytes(range(256)) * 2


def test_the_plugin_imports_only_the_plugin_surface() -> None:
    """A separately installed device knows only vmrun.api (and the standard library)."""
    import ast

    pkg = Path(__file__).resolve().parent.parent / "vmrun_virtio_blk"
    for src in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(src.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.startswith("vmrun") and not name.startswith("vmrun_virtio_blk"):
                    assert name == "vmrun.api", f"{src.name} imports {name}"
