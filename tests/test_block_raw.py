"""RawFile: vectored I/O straight into (simulated) guest RAM, locking, O_DIRECT, discard."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmrun.block import RawFile, parse_sectorsize
from vmrun.block import raw as raw_mod
from vmrun.errors import VmrunError

MiB = 1 << 20


@pytest.fixture
def ram() -> memoryview:
    """Guest RAM stand-in: an anonymous mapping, like GuestMemory's slots."""
    return memoryview(mmap.mmap(-1, 4 * MiB))


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A directory on a real filesystem (tmpfs refuses O_DIRECT and may not punch holes)."""
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="vmrun-block-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_file(path: Path, size: int, data: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(data)
    return path


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 + 1 for i in range(n))


def open_direct(path: Path, **kw) -> RawFile:
    try:
        return RawFile(path, nocache=True, **kw)
    except VmrunError as e:
        if "O_DIRECT" in str(e):
            pytest.skip("filesystem refuses O_DIRECT")
        raise


def test_round_trip_through_guest_memory(tmp_path: Path, ram: memoryview) -> None:
    path = make_file(tmp_path / "disk.img", MiB)
    data = pattern(3 * 512)
    ram[4096:4096 + 512] = data[:512]
    ram[65536:65536 + 1024] = data[512:]
    with RawFile(path) as disk:
        assert disk.size == MiB and not disk.read_only
        assert disk.writev(8192, [ram[4096:4096 + 512], ram[65536:65536 + 1024]]) == 1536
        out = [ram[200000:200000 + 100], ram[300000:300000 + 1436]]
        assert disk.readv(8192, out) == 1536
        assert bytes(out[0]) + bytes(out[1]) == data
        disk.flush()
    assert path.read_bytes()[8192:8192 + 1536] == data


def test_read_only_buffers_and_many_iovecs(tmp_path: Path, ram: memoryview) -> None:
    path = make_file(tmp_path / "disk.img", MiB)
    bufs = [memoryview(bytes([i % 256]) * 512) for i in range(1500)]  # more than IOV_MAX
    with RawFile(path) as disk:
        assert disk.writev(0, bufs) == 1500 * 512
        out = [ram[i * 512:(i + 1) * 512] for i in range(1500)]
        disk.readv(0, out)
    assert all(o[0] == i % 256 and o[511] == i % 256 for i, o in enumerate(out))


def test_short_read_at_end_of_file_fills_zeros(tmp_path: Path, ram: memoryview) -> None:
    path = make_file(tmp_path / "odd.img", 1000, b"\x00" * 512 + b"\xaa" * 488)
    with RawFile(path) as disk:
        assert disk.size == 1000
        ram[0:512] = b"\xff" * 512
        assert disk.readv(512, [ram[0:512]]) == 512
        assert bytes(ram[0:488]) == b"\xaa" * 488 and bytes(ram[488:512]) == bytes(24)
        with pytest.raises(OSError):
            disk.readv(1024, [ram[0:512]])
        with pytest.raises(OSError):
            disk.writev(512, [ram[0:512]])  # past the exact size: never grows the file


def test_read_only_rejects_writes(tmp_path: Path, ram: memoryview) -> None:
    path = make_file(tmp_path / "disk.img", MiB)
    with RawFile(path, read_only=True) as disk:
        assert disk.read_only and not disk.supports_discard
        disk.readv(0, [ram[0:512]])
        with pytest.raises(PermissionError):
            disk.writev(0, [ram[0:512]])
        with pytest.raises(PermissionError):
            disk.write_zeroes(0, 512, unmap=False)
        with pytest.raises(PermissionError):
            disk.discard(0, 512)


def test_lock_prevents_a_second_writer(tmp_path: Path) -> None:
    path = make_file(tmp_path / "disk.img", MiB)
    disk = RawFile(path)
    with pytest.raises(VmrunError, match="image is in use by another process"):
        RawFile(path)
    with pytest.raises(VmrunError, match="in use"):
        RawFile(path, read_only=True)
    disk.close()
    disk.close()  # harmless twice
    with RawFile(path, read_only=True), RawFile(path, read_only=True):
        with pytest.raises(VmrunError, match="in use"):
            RawFile(path)
    RawFile(path).close()


def test_open_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(VmrunError, match="no such disk image"):
        RawFile(tmp_path / "missing.img")
    with pytest.raises(VmrunError, match="is a directory"):
        RawFile(tmp_path)
    with pytest.raises(VmrunError, match="is a directory, not a regular file or a block device"):
        RawFile(tmp_path, read_only=True)
    with pytest.raises(VmrunError) as info:
        RawFile(tmp_path / "missing.img")
    assert "\n" not in str(info.value)


def test_o_direct_aligned_and_misaligned(disk_dir: Path, ram: memoryview) -> None:
    path = make_file(disk_dir / "disk.img", MiB)
    expect = bytearray(MiB)
    with open_direct(path) as disk:
        # Page-aligned guest buffers: straight to the file.
        data = pattern(8192)
        ram[0:8192] = data
        assert disk._aligned(4096, [ram[0:4096], ram[4096:8192]])
        disk.writev(4096, [ram[0:4096], ram[4096:8192]])
        expect[4096:4096 + 8192] = data
        # Misaligned address, length and offset: through the bounce buffer.
        odd = pattern(700, seed=9)
        ram[12345:12345 + 700] = odd
        assert not disk._aligned(100, [ram[12345:12345 + 700]])
        disk.writev(100, [ram[12345:12345 + 700]])
        expect[100:800] = odd
        # A misaligned write inside one aligned block (read-modify-write keeps the rest).
        disk.writev(4096 + 10, [memoryview(b"xyz")])
        expect[4106:4109] = b"xyz"
        disk.flush()
        for off, n, at in ((0, 16384, 1), (4096, 8192, 0), (37, 5000, 3)):
            out = ram[MiB + at:MiB + at + n]
            disk.readv(off, [out])
            assert bytes(out) == bytes(expect[off:off + n])
    assert path.read_bytes() == bytes(expect)


def test_o_direct_odd_sized_file(disk_dir: Path, ram: memoryview) -> None:
    path = make_file(disk_dir / "odd.img", 4096 + 1000)
    with open_direct(path) as disk:
        ram[0:512] = b"\x5a" * 512
        disk.writev(4096 + 512, [ram[0:488]])  # the block holding end of file
        out = ram[8192:8192 + 1024]
        disk.readv(4096, [out])
        assert bytes(out) == bytes(512) + b"\x5a" * 488 + bytes(24)
    assert path.stat().st_size == 4096 + 1000


def test_discard_punches_holes(disk_dir: Path, ram: memoryview) -> None:
    path = make_file(disk_dir / "disk.img", 4 * MiB)
    with RawFile(path) as disk:
        if not disk.supports_discard:
            pytest.skip("filesystem cannot punch holes")
        ram[0:4 * MiB] = b"\x11" * (4 * MiB)
        disk.writev(0, [ram[0:4 * MiB]])
        disk.flush()
        before = os.stat(path).st_blocks
        disk.discard(MiB, 2 * MiB)
        assert os.stat(path).st_blocks < before - (MiB // 512)
        disk.readv(0, [ram[0:4 * MiB]])
        assert bytes(ram[MiB:3 * MiB]) == bytes(2 * MiB)
        assert bytes(ram[0:MiB]) == b"\x11" * MiB and bytes(ram[3 * MiB:4 * MiB]) == b"\x11" * MiB
    assert path.stat().st_size == 4 * MiB


def test_write_zeroes(disk_dir: Path, ram: memoryview, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_file(disk_dir / "disk.img", 2 * MiB, b"\x22" * (2 * MiB))
    with RawFile(path) as disk:
        disk.write_zeroes(512, 1024, unmap=False)
        disk.write_zeroes(MiB, MiB, unmap=True)

        def no_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "not here")

        monkeypatch.setattr(raw_mod, "fallocate", no_fallocate)
        disk.write_zeroes(4096, 100, unmap=False)  # falls back to writing zeros
        disk.readv(0, [ram[0:2 * MiB]])
    got = bytes(ram[0:2 * MiB])
    assert got[:512] == b"\x22" * 512 and got[512:1536] == bytes(1024)
    assert got[4096:4196] == bytes(100) and got[4196:MiB] == b"\x22" * (MiB - 4196)
    assert got[MiB:] == bytes(MiB)
    assert path.stat().st_size == 2 * MiB


def test_sector_size_and_parse_sectorsize(tmp_path: Path) -> None:
    assert parse_sectorsize("512") == (512, 512)
    assert parse_sectorsize("512/4096") == (512, 4096)
    assert parse_sectorsize("4096") == (4096, 4096)
    for bad in ("4096/512", "1000", "256", "131072", "abc", "512/", "1/2/3"):
        with pytest.raises(ValueError):
            parse_sectorsize(bad)
    path = make_file(tmp_path / "disk.img", MiB)
    with RawFile(path, sector_size=(512, 4096)) as disk:
        assert (disk.logical_sector_size, disk.physical_sector_size) == (512, 4096)
    with pytest.raises(VmrunError, match="power of two"):
        RawFile(path, sector_size=(500, 500))
