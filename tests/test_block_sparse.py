"""The xhyve fork's sparse/split format: LUT allocation, segments, crash ordering, threads."""

from __future__ import annotations

import array
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrun.block import SparseSplitDisk
from vmrun.block.sparse import FREE, lut_path, segment_path
from vmrun.errors import VmrunError

SS = 512


def lut(base: Path) -> list[int]:
    a = array.array("I")
    a.frombytes(lut_path(base).read_bytes())
    return a.tolist()


def sector(value: int, n: int = SS) -> memoryview:
    return memoryview(bytes([value]) * n)


def read(disk: SparseSplitDisk, offset: int, n: int) -> bytes:
    buf = memoryview(bytearray(b"\xee" * n))  # garbage first: unwritten data must be cleared
    assert disk.readv(offset, [buf]) == n
    return bytes(buf)


def test_create_and_allocation_order(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    with SparseSplitDisk(base, size=64 * SS, sparse=True) as disk:
        assert disk.size == 64 * SS and disk.split == disk.size and disk.supports_discard
        assert lut(base) == [FREE] * 64
        assert segment_path(base, 0).stat().st_size == 0
        disk.writev(5 * SS, [sector(5)])
        disk.writev(2 * SS, [sector(2)])
        disk.writev(9 * SS, [sector(9, 256), sector(9, 256)])
        disk.writev(5 * SS, [sector(55)])  # in place: no new slot
        table = lut(base)  # already on disk, before any flush or close
        assert (table[5], table[2], table[9]) == (0, 1, 2)
        assert table.count(FREE) == 61
        seg = segment_path(base, 0).read_bytes()
        assert seg == b"\x37" * SS + b"\x02" * SS + b"\x09" * SS
        assert read(disk, 2 * SS, 8 * SS) == (bytes([2]) * SS + bytes(2 * SS) + bytes([55]) * SS
                                              + bytes(3 * SS) + bytes([9]) * SS)


def test_zero_writes_allocate_nothing(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    with SparseSplitDisk(base, size=1 << 20, split=256 << 10, sparse=True) as disk:
        disk.writev(0, [memoryview(bytes(1 << 20))])
        assert all(segment_path(base, i).stat().st_size == 0 for i in range(4))
        assert lut(base) == [FREE] * 2048
        # A request mixing zero and non-zero sectors allocates only the non-zero ones.
        data = bytes(SS) + b"\x01" * SS + bytes(2 * SS) + b"\x02" * 10 + bytes(SS - 10)
        disk.writev(8 * SS, [memoryview(data)])
        table = lut(base)
        assert [i for i, e in enumerate(table) if e != FREE] == [9, 12]
        # Zeros over an allocated sector are written in place.
        disk.writev(9 * SS, [sector(0)])
        assert lut(base)[9] == 0 and read(disk, 9 * SS, SS) == bytes(SS)
        assert segment_path(base, 0).stat().st_size == 2 * SS


def test_reopen_preserves_data_and_geometry(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    with SparseSplitDisk(base, size=32 * 4096, split=8 * 4096, sparse=True,
                         sector_size=4096) as disk:
        disk.writev(4096 * 7, [sector(7, 4096), sector(8, 4096)])  # crosses into segment 1
        disk.flush()
    assert [p.name for p in sorted(tmp_path.iterdir())] == [
        "disk.0000", "disk.0001", "disk.0002", "disk.0003", "disk.lut"]
    with SparseSplitDisk(base, split=8 * 4096, sector_size=4096, read_only=True) as disk:
        assert disk.size == 32 * 4096 and disk.sparse and disk.logical_sector_size == 4096
        assert read(disk, 4096 * 7, 8192) == b"\x07" * 4096 + b"\x08" * 4096
        with pytest.raises(PermissionError):
            disk.writev(0, [sector(1, 4096)])
    # One data sector per segment file, each at slot 0.
    assert segment_path(base, 0).stat().st_size == 4096
    assert segment_path(base, 1).stat().st_size == 4096
    assert lut(base)[7] == 0 and lut(base)[8] == 0


def test_request_spanning_segments_and_partial_sectors(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    model = bytearray(12 * SS)
    with SparseSplitDisk(base, size=12 * SS, split=4 * SS, sparse=True) as disk:
        data = bytes(range(256)) * 20  # 5120 bytes from offset 700: three segments
        disk.writev(700, [memoryview(data[:1000]), memoryview(data[1000:])])
        model[700:700 + len(data)] = data
        disk.writev(3 * SS + 17, [memoryview(b"hello")])  # sub-sector, allocated sector
        model[3 * SS + 17:3 * SS + 22] = b"hello"
        disk.writev(11 * SS + 500, [memoryview(b"tail")])  # sub-sector, new sector
        model[11 * SS + 500:11 * SS + 504] = b"tail"
        assert read(disk, 0, 12 * SS) == bytes(model)
        assert read(disk, 701, 2000) == bytes(model[701:2701])
        assert read(disk, 3, 4) == bytes(4)
    with SparseSplitDisk(base, size=12 * SS, split=4 * SS) as disk:
        assert read(disk, 0, 12 * SS) == bytes(model)


def test_split_without_sparse(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    with SparseSplitDisk(base, size=10 * 1024, split=4096) as disk:
        assert not disk.sparse
        disk.writev(4000, [memoryview(b"A" * 200)])
        assert read(disk, 4000, 200) == b"A" * 200
    sizes = [segment_path(base, i).stat().st_size for i in range(3)]
    assert sizes == [4096, 4096, 2048] and not lut_path(base).exists()
    assert segment_path(base, 0).read_bytes()[4000:] == b"A" * 96
    assert segment_path(base, 1).read_bytes()[:104] == b"A" * 104
    with SparseSplitDisk(base) as disk:  # geometry from the files
        assert (disk.size, disk.split) == (10 * 1024, 4096)
        disk.discard(0, 8192)
        disk.write_zeroes(8192, 100, unmap=False)
        assert read(disk, 0, 10 * 1024) == bytes(10 * 1024)
    with pytest.raises(VmrunError, match="size=9"):
        SparseSplitDisk(base, size=9)
    segment_path(base, 1).write_bytes(b"x" * 100)
    with pytest.raises(VmrunError, match=r"disk\.0001: segment is 100 bytes, expected 4096"):
        SparseSplitDisk(base)


def test_discard_and_write_zeroes(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    with SparseSplitDisk(base, size=16 * SS, sparse=True) as disk:
        disk.writev(0, [memoryview(b"\x33" * (16 * SS))])
        disk.discard(SS + 100, 4 * SS)  # whole sectors 2..4 freed, ends zeroed in place
        table = lut(base)
        assert table[2:5] == [FREE] * 3 and table[1] == 1 and table[5] == 5
        got = read(disk, 0, 16 * SS)
        assert got[:SS + 100] == b"\x33" * (SS + 100)
        assert got[SS + 100:5 * SS + 100] == bytes(4 * SS)
        assert got[5 * SS + 100:] == b"\x33" * (11 * SS - 100)
        disk.write_zeroes(8 * SS, 2 * SS, unmap=False)  # stays allocated
        assert lut(base)[8:10] == [8, 9] and read(disk, 8 * SS, 2 * SS) == bytes(2 * SS)
        disk.write_zeroes(10 * SS, 2 * SS, unmap=True)
        assert lut(base)[10:12] == [FREE, FREE]
        disk.writev(3 * SS, [sector(0x44)])  # a freed sector gets a fresh slot
        assert lut(base)[3] == 16 and read(disk, 3 * SS, SS) == b"\x44" * SS


def test_concurrent_writers(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    sectors, threads_n = 256, 8
    model = bytearray(sectors * SS)
    with SparseSplitDisk(base, size=sectors * SS, split=64 * SS, sparse=True) as disk:
        def own(tid: int) -> None:
            """Each thread owns blocks of 4 sectors; writes inside them, partial ones too."""
            rng = random.Random(tid)
            blocks = [b for b in range(sectors // 4) if b % threads_n == tid]
            for _ in range(60):
                b = rng.choice(blocks)
                lo = b * 4 * SS + rng.randrange(4 * SS)
                n = rng.randrange(1, (b + 1) * 4 * SS - lo + 1)
                data = rng.randbytes(n)
                disk.writev(lo, [memoryview(data)])
                model[lo:lo + n] = data
                assert read(disk, lo, n) == data

        def same(tid: int) -> None:
            """Everyone writes the same bytes to the same never-written sectors at once."""
            for s in range(0, sectors, 4):
                disk.writev(s * SS + SS, [sector(s % 250 + 3, 2 * SS)])

        for s in range(0, sectors, 4):
            model[s * SS + SS:s * SS + 3 * SS] = bytes([s % 250 + 3]) * 2 * SS
        for target in (same, own):
            threads = [threading.Thread(target=target, args=(t,)) for t in range(threads_n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if target is same:
                assert sum(e != FREE for e in lut(base)) == sectors // 2
            assert read(disk, 0, sectors * SS) == bytes(model)
        disk.check()
    table = lut(base)
    for seg in range(4):
        slots = [e for e in table[seg * 64:(seg + 1) * 64] if e != FREE]
        assert len(set(slots)) == len(slots)  # no slot handed out twice
        assert segment_path(base, seg).stat().st_size == len(slots) * SS  # nor leaked


OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 16 * SS - 1), st.integers(1, 3 * SS),
              st.sampled_from(["random", "zero", "byte"])),
    st.tuples(st.just("read"), st.integers(0, 16 * SS - 1), st.integers(1, 3 * SS)),
    st.tuples(st.just("zeroes"), st.integers(0, 16 * SS - 1), st.integers(1, 3 * SS),
              st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, 16 * SS - 1), st.integers(1, 3 * SS)),
    st.tuples(st.just("reopen")),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=25), seed=st.integers(0, 2**32 - 1))
def test_model_against_bytearray(ops: list[tuple], seed: int) -> None:
    rng = random.Random(seed)
    size = 16 * SS
    model = bytearray(size)
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "disk"
        disk = SparseSplitDisk(base, size=size, split=6 * SS, sparse=True)
        try:
            for op in ops:
                if op[0] == "reopen":
                    disk.close()
                    disk = SparseSplitDisk(base, split=6 * SS)
                    continue
                offset, n = op[1], min(op[2], size - op[1])
                if op[0] == "write":
                    data = {"random": rng.randbytes(n), "zero": bytes(n),
                            "byte": bytes([rng.randrange(1, 256)]) * n}[op[3]]
                    cut = sorted(rng.sample(range(n + 1), min(2, n + 1)))
                    bufs = [memoryview(data[:cut[0]]), memoryview(data[cut[0]:cut[-1]]),
                            memoryview(data[cut[-1]:])]
                    assert disk.writev(offset, bufs) == n
                    model[offset:offset + n] = data
                elif op[0] == "read":
                    assert read(disk, offset, n) == bytes(model[offset:offset + n])
                else:
                    if op[0] == "zeroes":
                        disk.write_zeroes(offset, n, op[3])
                    else:
                        disk.discard(offset, n)
                    model[offset:offset + n] = bytes(n)
            assert read(disk, 0, size) == bytes(model)
            disk.check()
            # Never-written sectors hold no space: allocated entries <= non-zero sectors ever.
            assert sum(e != FREE for e in lut(base)) <= size // SS
        finally:
            disk.close()


def one_line(exc: pytest.ExceptionInfo[VmrunError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_corrupt_or_mismatched_images(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    SparseSplitDisk(base, size=8 * SS, split=4 * SS, sparse=True).close()
    with pytest.raises(VmrunError, match="give split=") as e:
        SparseSplitDisk(base)
    assert str(base) in one_line(e)
    with pytest.raises(VmrunError, match=r"has 8 entries .* but size=8192") as e:
        SparseSplitDisk(base, size=8192, split=4 * SS)
    with pytest.raises(VmrunError, match="has 2 segment files but size 4096 with split 1024 "
                                         "needs 4"):
        SparseSplitDisk(base, split=2 * SS)
    with pytest.raises(VmrunError, match="already exists"):
        from vmrun.block.sparse import create_sparse_split
        create_sparse_split(base, 8 * SS, 4 * SS, True)
    # An entry pointing past its segment's data: refused at open; with verify=False found by
    # problems()/check(), and an EIO on the data path.
    raw = bytearray(lut_path(base).read_bytes())
    raw[4:8] = (3).to_bytes(4, "little")
    lut_path(base).write_bytes(bytes(raw))
    with pytest.raises(VmrunError, match=r"disk\.lut: sector 1 points at slot 3, past the end") \
            as e:
        SparseSplitDisk(base, split=4 * SS)
    one_line(e)
    with SparseSplitDisk(base, split=4 * SS, verify=False) as disk:
        with pytest.raises(VmrunError, match=r"disk\.lut: sector 1 points at slot 3, past the end"):
            disk.check()
        assert len(disk.problems()) == 1
        with pytest.raises(OSError, match="corrupt LUT"):
            read(disk, 0, 2 * SS)
        assert read(disk, 4 * SS, SS) == bytes(SS)
    # A LUT that is not whole entries.
    lut_path(base).write_bytes(bytes(raw) + b"\x00")
    with pytest.raises(VmrunError, match=r"disk\.lut: 33 bytes .* \(corrupt LUT\)") as e:
        SparseSplitDisk(base, split=4 * SS)
    one_line(e)
    # A missing segment file.
    lut_path(base).write_bytes(b"\xff" * 32)
    segment_path(base, 1).unlink()
    with pytest.raises(VmrunError, match="has 1 segment files but size 4096 with split 2048"):
        SparseSplitDisk(base, split=4 * SS)
    segment_path(base, 0).unlink()
    with pytest.raises(VmrunError, match=r"disk\.0000: no such segment file"):
        SparseSplitDisk(base, split=4 * SS)


def test_creation_errors_and_locking(tmp_path: Path) -> None:
    with pytest.raises(VmrunError, match="give size= to create it"):
        SparseSplitDisk(tmp_path / "none", sparse=True)
    with pytest.raises(VmrunError, match="multiple of the sector size"):
        SparseSplitDisk(tmp_path / "a", size=1000, sparse=True)
    with pytest.raises(VmrunError, match="split 1000 must be"):
        SparseSplitDisk(tmp_path / "b", size=4096, split=1000, sparse=True)
    with pytest.raises(VmrunError, match="nocache is not supported"):
        SparseSplitDisk(tmp_path / "c", size=4096, sparse=True, nocache=True)
    assert not list(tmp_path.glob("a.*")) and not list(tmp_path.glob("b.*"))
    base = tmp_path / "d"
    with SparseSplitDisk(base, size=4096, sparse=True):
        with pytest.raises(VmrunError, match="image is in use by another process"):
            SparseSplitDisk(base)
    with SparseSplitDisk(base, read_only=True), SparseSplitDisk(base, read_only=True):
        pass


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    """A VMM killed right after acknowledging a write loses nothing (LUT included)."""
    base = tmp_path / "disk"
    SparseSplitDisk(base, size=64 * SS, sparse=True).close()
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from vmrun.block import SparseSplitDisk
d = SparseSplitDisk({str(base)!r})
d.writev(3 * {SS}, [memoryview(b"\\x77" * {SS})])
d.writev(40 * {SS} + 5, [memoryview(b"persist")])
d.flush()
print("acked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "acked"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with SparseSplitDisk(base) as disk:  # the lock died with the process
        assert read(disk, 3 * SS, SS) == b"\x77" * SS
        assert read(disk, 40 * SS, 12) == b"\x00" * 5 + b"persist"
        disk.check()
