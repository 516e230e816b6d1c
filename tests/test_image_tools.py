"""Image tools: create, convert raw <-> sparse/split, and open_disk's choice of backend."""

from __future__ import annotations

import array
import os
from pathlib import Path

import pytest

from vmrun.block import (
    RawFile,
    SparseSplitDisk,
    convert_image,
    create_image,
    open_disk,
    parse_size,
)
from vmrun.block.sparse import FREE, lut_path, segment_path
from vmrun.errors import VmrunError

MiB = 1 << 20


def allocated(base: Path) -> int:
    a = array.array("I")
    a.frombytes(lut_path(base).read_bytes())
    return sum(e != FREE for e in a)


def make_raw(path: Path) -> bytes:
    """A 4 MiB raw image with data here and there and long runs of zeros."""
    create_image(path, 4 * MiB)
    content = bytearray(4 * MiB)
    content[0:512] = b"\x01" * 512                      # first sector
    content[MiB + 4096:MiB + 4096 + 1000] = b"\x02" * 1000  # two partial sectors mid-chunk
    content[-10:] = b"\x03" * 10                        # the very end
    with open(path, "r+b") as f:
        f.write(content[0:512])
        f.seek(MiB + 4096)
        f.write(content[MiB + 4096:MiB + 5096])
        f.seek(4 * MiB - 10)
        f.write(content[-10:])
    return bytes(content)


def test_create_images(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    create_image(raw, 64 * MiB)
    assert raw.stat().st_size == 64 * MiB and raw.stat().st_blocks == 0
    create_image(tmp_path / "sp", 8 * MiB, fmt="sparse", split=3 * MiB, sector_size=4096)
    assert lut_path(tmp_path / "sp").read_bytes() == b"\xff" * (8 * MiB // 4096 * 4)
    assert [segment_path(tmp_path / "sp", i).stat().st_size for i in range(3)] == [0, 0, 0]
    create_image(tmp_path / "split", 5 * MiB, fmt="raw", split=2 * MiB)
    assert [segment_path(tmp_path / "split", i).stat().st_size for i in range(3)] == \
        [2 * MiB, 2 * MiB, MiB]
    for path, fmt in ((raw, "raw"), (tmp_path / "sp", "raw"), (tmp_path / "split", "sparse")):
        with pytest.raises(VmrunError, match="already exists"):
            create_image(path, MiB, fmt=fmt)
    with pytest.raises(VmrunError, match="unknown image format 'vmdk'"):
        create_image(tmp_path / "q", MiB, fmt="vmdk")
    with pytest.raises(VmrunError, match="multiple of the sector size"):
        create_image(tmp_path / "odd", 1000, fmt="sparse")
    # Nothing temporary is left behind.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_raw_to_sparse_to_raw_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    content = make_raw(src)
    calls: list[tuple[int, int]] = []
    convert_image(src, tmp_path / "sp", "sparse", split=MiB,
                  progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (4 * MiB, 4 * MiB) and len(calls) == 4
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # Only sectors that hold data were stored: 1 + 2 (the 1000 bytes straddle) + 1.
    assert allocated(tmp_path / "sp") == 4
    assert sum(segment_path(tmp_path / "sp", i).stat().st_size for i in range(4)) == 4 * 512
    convert_image(tmp_path / "sp", tmp_path / "back.img", "raw", src_split=MiB)
    back = tmp_path / "back.img"
    assert back.read_bytes() == content
    assert back.stat().st_blocks * 512 < MiB  # still a sparse host file
    # And through a plain split image too.
    convert_image(back, tmp_path / "split", "raw", split=3 * MiB)
    with open_disk(tmp_path / "split") as disk:
        assert isinstance(disk, SparseSplitDisk) and not disk.sparse
        buf = memoryview(bytearray(4 * MiB))
        disk.readv(0, [buf])
        assert bytes(buf) == content
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_refuses_existing_destination(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_raw(src)
    (tmp_path / "dst.img").write_bytes(b"keep")
    with pytest.raises(VmrunError, match="already exists"):
        convert_image(src, tmp_path / "dst.img", "raw")
    assert (tmp_path / "dst.img").read_bytes() == b"keep"
    create_image(tmp_path / "sp", MiB, fmt="sparse")
    with pytest.raises(VmrunError, match="already exists"):
        convert_image(src, tmp_path / "sp", "sparse")
    with pytest.raises(VmrunError, match="no such disk image"):
        convert_image(tmp_path / "missing.img", tmp_path / "x.img", "raw")


def test_failed_convert_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_raw(src)

    def boom(done: int, total: int) -> None:
        if done >= 2 * MiB:
            raise KeyboardInterrupt

    for fmt in ("raw", "sparse"):
        with pytest.raises(KeyboardInterrupt):
            convert_image(src, tmp_path / "dst", fmt, progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.img"]


def test_sparse_source_needs_its_split(tmp_path: Path) -> None:
    create_image(tmp_path / "sp", 4 * MiB, fmt="sparse", split=MiB)
    with pytest.raises(VmrunError, match="give split="):
        convert_image(tmp_path / "sp", tmp_path / "out.img", "raw")


def test_open_disk_picks_the_backend(tmp_path: Path) -> None:
    with open_disk(tmp_path / "new.img", size=MiB, sector_size=(512, 4096)) as disk:
        assert isinstance(disk, RawFile) and disk.size == MiB
        assert disk.physical_sector_size == 4096
    with pytest.raises(VmrunError, match="size=2048"):
        open_disk(tmp_path / "new.img", size=2048)
    with open_disk(tmp_path / "sp", size=MiB, sparse=True, sector_size=4096) as disk:
        assert isinstance(disk, SparseSplitDisk) and disk.sparse
    with open_disk(tmp_path / "sp", sector_size=4096, read_only=True) as disk:
        assert isinstance(disk, SparseSplitDisk) and disk.size == MiB and disk.read_only
    with open_disk(tmp_path / "split", size=MiB, split=MiB // 2) as disk:
        assert isinstance(disk, SparseSplitDisk) and not disk.sparse
    with pytest.raises(VmrunError, match="no such disk image"):
        open_disk(tmp_path / "nothing.img")
    assert sorted(os.listdir(tmp_path)) == [
        "new.img", "sp.0000", "sp.lut", "split.0000", "split.0001"]


def test_parse_size() -> None:
    assert parse_size("20G") == 20 << 30
    assert parse_size("1g") == 1 << 30
    assert parse_size("512") == 512
    assert parse_size("4KiB") == 4096
    assert parse_size(" 3 MB ") == 3 << 20
    assert parse_size(42) == 42
    for bad in ("", "G", "1.5G", "-1", "12X", "1 G B", "0x10", "1P", True, -1, 1.0):
        with pytest.raises(ValueError) as e:
            parse_size(bad)
        assert str(bad) in str(e.value)   # the message names the bad text


def test_parse_size_is_the_config_loaders() -> None:
    """One set of rules for disk sizes, memory sizes and size options."""
    from vmrun.block import image_tools
    from vmrun.config import parse_size as config_parse_size

    assert parse_size is image_tools.parse_size is config_parse_size
