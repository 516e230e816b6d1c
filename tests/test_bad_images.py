"""A corpus of bad disk images and bad `vmrun image` requests (issue 10).

Each case builds its image in a fresh directory, makes one request, and checks that the answer
is a one-line VmrunError naming what is wrong, that it comes within a few seconds (nothing
blocks on a FIFO or a device), and that the directory is byte for byte as it was: no debris,
nothing half-written, nothing "repaired".
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmrun.block.image_tools import (
    check_image,
    convert_image,
    create_image,
    disk_being_created,
    open_disk,
    remove_created,
)
from vmrun.block.sparse import FREE, SparseSplitDisk, lut_path, segment_path
from vmrun.errors import VmrunError

SS = 512
Held = list  # backends a case keeps open while the request runs


def snapshot(d: Path) -> dict[str, tuple]:
    """Every entry under ``d``: type, and the bytes of regular files / targets of links."""
    out: dict[str, tuple] = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            key = str(p.relative_to(d))
            if stat.S_ISREG(st.st_mode):
                out[key] = ("file", p.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                out[key] = ("link", os.readlink(p))
            else:
                out[key] = (stat.S_IFMT(st.st_mode),)
    return out


def sparse(d: Path, sectors: int = 8, split: int | None = 4, written: int = 0,
           ss: int = SS) -> Path:
    """A sparse image ``d/disk`` with the first ``written`` sectors written."""
    base = d / "disk"
    with SparseSplitDisk(base, size=sectors * ss, split=None if split is None else split * ss,
                         sparse=True, sector_size=ss) as disk:
        for i in range(written):
            disk.writev(i * ss, [memoryview(bytes([i % 250 + 1]) * ss)])
    return base


def split_image(d: Path, size: int = 10 * 1024, split: int = 4096) -> Path:
    base = d / "disk"
    SparseSplitDisk(base, size=size, split=split).close()
    return base


def set_entry(base: Path, index: int, value: int) -> None:
    raw = bytearray(lut_path(base).read_bytes())
    raw[4 * index:4 * index + 4] = value.to_bytes(4, "little")
    lut_path(base).write_bytes(bytes(raw))


def replace_with_fifo(p: Path) -> None:
    p.unlink(missing_ok=True)
    os.mkfifo(p)


def replace_with_dir(p: Path) -> None:
    p.unlink(missing_ok=True)
    p.mkdir()


def replace_with_link(p: Path, target: str | None = None) -> None:
    if target is None:
        other = p.with_name("other")
        other.write_bytes(p.read_bytes())
        target = "other"
    p.unlink(missing_ok=True)
    p.symlink_to(target)


_sockets: list[socket.socket] = []


def replace_with_socket(p: Path) -> None:
    p.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    _sockets.append(s)


def raw(d: Path, n: int = 4096) -> Path:
    p = d / "disk.img"
    p.write_bytes(b"\x5a" * n)
    return p


# -- the cases: (id, build(dir) -> (action, held), error fragment) ---------------------------

Build = Callable[[Path], tuple[Callable[[], object], Held]]


def opens(path_of: Callable[[Path], Path], **kw: object) -> Build:
    def build(d: Path) -> tuple[Callable[[], object], Held]:
        p = path_of(d)
        return (lambda: open_disk(p, **kw).close()), []
    return build


def after(prepare: Callable[[Path], Path], **kw: object) -> Build:
    return opens(prepare, **kw)


def b_raw_fifo(d: Path) -> Path:
    p = d / "disk.img"
    os.mkfifo(p)
    return p


def b_raw_socket(d: Path) -> Path:
    p = d / "disk.img"
    replace_with_socket(p)
    return p


def b_raw_dir(d: Path) -> Path:
    p = d / "disk.img"
    p.mkdir()
    return p


def b_link_to(target: str) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        p = d / "disk.img"
        p.symlink_to(target)
        return p
    return b


def b_sparse_part(part: str, how: Callable[[Path], None], **kw: object) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        base = sparse(d, written=2)
        how(lut_path(base) if part == "lut" else segment_path(base, int(part)))
        return base
    return b


def b_entry(index: int, value: int, sectors: int = 8, split: int | None = 4,
            written: int = 2) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        base = sparse(d, sectors=sectors, split=split, written=written)
        set_entry(base, index, value)
        return base
    return b


def b_truncate_seg(length: int) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        base = sparse(d, written=2)
        os.truncate(segment_path(base, 0), length)
        return base
    return b


def b_lut_bytes(data: bytes) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        base = sparse(d)
        lut_path(base).write_bytes(data)
        return base
    return b


def b_sparse_unlink(seg: int, segments: int = 3) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        base = sparse(d, sectors=4 * segments)
        segment_path(base, seg).unlink()
        return base
    return b


def b_split_part(seg: int, how: Callable[[Path], None]) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        base = split_image(d)
        how(segment_path(base, seg))
        return base
    return b


def b_split_resize(seg: int, length: int) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        base = split_image(d)
        os.truncate(segment_path(base, seg), length)
        return base
    return b


def b_split_unlink(seg: int) -> Callable[[Path], Path]:
    def b(d: Path) -> Path:
        base = split_image(d, size=12 * 1024)
        segment_path(base, seg).unlink()
        return base
    return b


def lock_case(first: Callable[[Path], tuple[Path, dict]],
              second: Callable[[Path], tuple[Path, dict]]) -> Build:
    def build(d: Path) -> tuple[Callable[[], object], Held]:
        p1, kw1 = first(d)
        held = [open_disk(p1, **kw1)]
        p2, kw2 = second(d)
        return (lambda: open_disk(p2, **kw2).close()), held
    return build


def sp(split: int | None = 4 * SS, **kw: object) -> Callable[[Path], tuple[Path, dict]]:
    def f(d: Path) -> tuple[Path, dict]:
        base = d / "disk"
        if not lut_path(base).exists():
            sparse(d, written=2)
        return base, {"split": split, **kw}
    return f


def part(name: str, **kw: object) -> Callable[[Path], tuple[Path, dict]]:
    return lambda d: (d / name, kw)


def raw_seg(d: Path) -> tuple[Path, dict]:
    sparse(d, written=2)
    return d / "disk.0000", {}


def sp_split(**kw: object) -> Callable[[Path], tuple[Path, dict]]:
    def f(d: Path) -> tuple[Path, dict]:
        base = d / "disk"
        if not segment_path(base, 0).exists():
            split_image(d)
        return base, {"split": 4096, **kw}
    return f


def creates(size: object, fmt: str = "raw", **kw: object) -> Build:
    return lambda d: ((lambda: create_image(d / "new.img", size, fmt, **kw)), [])  # type: ignore


def converts(prepare: Callable[[Path], Path], fmt: str = "raw", **kw: object) -> Build:
    def build(d: Path) -> tuple[Callable[[], object], Held]:
        src = prepare(d)
        return (lambda: convert_image(src, d / "out.img", fmt, **kw)), []
    return build


def b_existing(d: Path) -> tuple[Callable[[], object], Held]:
    (d / "new.img").write_bytes(b"x" * 512)
    return (lambda: create_image(d / "new.img", 4096)), []


def b_convert_self(d: Path) -> tuple[Callable[[], object], Held]:
    p = raw(d)
    return (lambda: convert_image(p, p, "sparse")), []


def b_sparse_nocache_create(d: Path) -> tuple[Callable[[], object], Held]:
    return (lambda: open_disk(d / "new", size=8 * SS, sparse=True, nocache=True)), []


def b_convert_killed(sig: int) -> Build:
    def build(d: Path) -> tuple[Callable[[], object], Held]:
        src = d / "src.img"
        src.write_bytes(os.urandom(3 << 20))

        def progress(done: int, total: int) -> None:
            if done >= 1 << 20:
                os.kill(os.getpid(), sig)
                time.sleep(1)  # the handler runs here
        return (lambda: convert_image(src, d / "out", "sparse", progress=progress)), []
    return build


def b_convert_write_fails(d: Path) -> tuple[Callable[[], object], Held]:
    src = raw(d, 1 << 20)

    class Full(SparseSplitDisk):
        pass

    import vmrun.block.image_tools as it

    real = it._write_nonzero

    def failing(target: object, pos: int, chunk: memoryview) -> None:
        raise OSError(28, "No space left on device")

    def action() -> None:
        it._write_nonzero = failing  # type: ignore[assignment]
        try:
            convert_image(src, d / "out", "sparse")
        finally:
            it._write_nonzero = real  # type: ignore[assignment]
    return action, []


CASES: list[tuple[str, Build, str]] = [
    # raw paths that are not images; none may block
    ("raw-fifo", opens(b_raw_fifo), "disk image is a FIFO"),
    ("raw-fifo-ro", opens(b_raw_fifo, read_only=True), "disk image is a FIFO"),
    ("raw-fifo-nocache", opens(b_raw_fifo, nocache=True), "disk image is a FIFO"),
    ("raw-socket", opens(b_raw_socket), "disk image is a socket"),
    ("raw-dir", opens(b_raw_dir), "disk image is a directory"),
    ("raw-dir-ro", opens(b_raw_dir, read_only=True), "disk image is a directory"),
    ("raw-dev-null", opens(lambda d: Path("/dev/null")), "is a character device"),
    ("raw-dev-zero-ro", opens(lambda d: Path("/dev/zero"), read_only=True),
     "is a character device"),
    ("raw-link-dev-zero", opens(b_link_to("/dev/zero")), "is a character device"),
    ("raw-link-fifo", opens(lambda d: (os.mkfifo(d / "f"), b_link_to("f")(d))[1]),
     "disk image is a FIFO"),
    ("raw-dangling-link", opens(b_link_to("nowhere")), "no such disk image"),
    ("raw-missing", opens(lambda d: d / "none.img"), "no such disk image"),
    ("raw-100-bytes", opens(lambda d: raw(d, 100)), "100 bytes, smaller than one 512-byte"),
    ("raw-empty", opens(lambda d: raw(d, 0)), "0 bytes, smaller than one 512-byte sector"),
    ("raw-1000-at-4k", opens(lambda d: raw(d, 1000), sector_size=4096),
     "smaller than one 4096-byte sector"),
    ("raw-size-mismatch", opens(lambda d: raw(d), size=8192), "4096 bytes but size=8192"),
    # sparse: parts that are not regular files of their own
    ("lut-fifo", opens(b_sparse_part("lut", replace_with_fifo)), "LUT file is a FIFO"),
    ("lut-dir", opens(b_sparse_part("lut", replace_with_dir)), "LUT file is a directory"),
    ("lut-socket", opens(b_sparse_part("lut", replace_with_socket)), "LUT file is a socket"),
    ("lut-symlink", opens(b_sparse_part("lut", replace_with_link), split=4 * SS),
     "LUT file is a symlink"),
    ("lut-link-dev-zero", opens(b_sparse_part("lut", lambda p: replace_with_link(p, "/dev/zero"))),
     "LUT file is a symlink"),
    ("seg-fifo", opens(b_sparse_part("0", replace_with_fifo), split=4 * SS),
     "disk.0000: segment file is a FIFO"),
    ("seg-fifo-ro", opens(b_sparse_part("1", replace_with_fifo), split=4 * SS, read_only=True),
     "disk.0001: segment file is a FIFO"),
    ("seg-dir", opens(b_sparse_part("0", replace_with_dir), split=4 * SS),
     "segment file is a directory"),
    ("seg-socket", opens(b_sparse_part("1", replace_with_socket), split=4 * SS),
     "segment file is a socket"),
    ("seg-symlink", opens(b_sparse_part("0", replace_with_link), split=4 * SS),
     "disk.0000: segment file is a symlink"),
    ("seg-link-dev-zero", opens(b_sparse_part("1", lambda p: replace_with_link(p, "/dev/zero")),
                                split=4 * SS), "segment file is a symlink"),
    # sparse: LUT contents
    ("lut-past-end", opens(b_entry(1, 3), split=4 * SS), "sector 1 points at slot 3, past the end"),
    ("lut-past-end-ro", opens(b_entry(1, 2), split=4 * SS, read_only=True),
     "sector 1 points at slot 2, past the end of"),
    ("lut-unwritten-seg", opens(b_entry(5, 0), split=4 * SS),
     "sector 5 points at slot 0, past the end of"),
    ("lut-reserved-fffffffe", opens(b_entry(0, FREE - 1), split=4 * SS),
     "points at slot 4294967294, past the end"),
    ("lut-reserved-high", opens(b_entry(2, 1 << 31), split=4 * SS), "points at slot 2147483648"),
    ("lut-duplicate", opens(b_entry(1, 0), split=4 * SS), "sectors 0 and 1 both point at slot 0"),
    ("lut-duplicate-unwritten", opens(b_entry(3, 1), split=4 * SS),
     "sectors 1 and 3 both point at slot 1"),
    ("lut-duplicate-far", opens(b_entry(3000, 0, sectors=4096, split=None), read_only=True),
     "sectors 0 and 3000 both point at slot 0"),
    ("lut-run-broken", opens(b_entry(2000, 5, sectors=4096, split=None, written=1500)),
     "sectors 5 and 2000 both point at slot 5"),
    ("seg-truncated-mid-sector", opens(b_truncate_seg(700), split=4 * SS),
     "sector 1 points at slot 1, past the end"),
    ("seg-truncated-empty", opens(b_truncate_seg(0), split=4 * SS),
     "sector 0 points at slot 0, past the end"),
    ("lut-empty", opens(b_lut_bytes(b""), split=4 * SS), "0 bytes is not a whole number"),
    ("lut-odd-length", opens(b_lut_bytes(b"\xff" * 33), split=4 * SS), "33 bytes is not a whole"),
    # sparse: geometry
    ("multi-seg-no-split", opens(lambda d: sparse(d)), "give split="),
    ("multi-seg-no-split-ro", opens(lambda d: sparse(d), read_only=True), "give split="),
    ("middle-seg-missing", opens(b_sparse_unlink(1)), "disk.0001: no such segment file, but"),
    ("middle-seg-missing-split", opens(b_sparse_unlink(1), split=4 * SS), "disk.0001: no such"),
    ("last-seg-missing", opens(b_sparse_unlink(2), split=4 * SS), "has 2 segment files"),
    ("first-seg-missing", opens(b_sparse_unlink(0), split=4 * SS), "disk.0000: no such segment"),
    ("wrong-split", opens(lambda d: sparse(d), split=8 * SS), "has 2 segment files but size"),
    ("split-not-sector-multiple", opens(lambda d: sparse(d), split=1000),
     "split 1000 must be a positive multiple"),
    ("sparse-bad-sectorsize", opens(lambda d: sparse(d), split=4 * SS, sector_size=1000),
     "power of two"),
    ("sparse-size-mismatch", opens(lambda d: sparse(d), split=4 * SS, size=8192),
     "has 8 entries"),
    ("sparse-nocache", opens(lambda d: sparse(d), split=4 * SS, nocache=True),
     "nocache is not supported"),
    ("sparse-create-nocache", b_sparse_nocache_create, "nocache is not supported"),
    # split (not sparse)
    ("split-seg-fifo", opens(b_split_part(1, replace_with_fifo), split=4096),
     "disk.0001: segment file is a FIFO"),
    ("split-seg-symlink", opens(b_split_part(0, replace_with_link), split=4096),
     "segment file is a symlink"),
    ("split-seg-dir", opens(b_split_part(2, replace_with_dir)), "segment file is a directory"),
    ("split-given-not-multiple", opens(lambda d: split_image(d), split=1000),
     "split 1000 must be a positive multiple"),
    ("split-inferred-not-multiple", opens(b_split_resize(0, 1000)),
     "split 1000 must be a positive multiple"),
    ("split-seg-wrong-length", opens(b_split_resize(1, 1024), split=4096),
     "disk.0001: segment is 1024 bytes, expected 4096"),
    ("split-last-empty", opens(b_split_resize(2, 0), split=4096),
     "disk.0002: segment is 0 bytes"),
    ("split-gap", opens(b_split_unlink(1), split=4096), "disk.0001: no such segment file, but"),
    # locking: every file of an image
    ("lock-sparse-seg-as-raw", lock_case(sp(), part("disk.0000")), "in use by another process"),
    ("lock-sparse-ro-seg-as-raw", lock_case(sp(read_only=True), part("disk.0001")), "in use"),
    ("lock-sparse-lut-as-raw", lock_case(sp(), part("disk.lut", read_only=True)), "in use"),
    ("lock-raw-seg-then-sparse", lock_case(raw_seg, sp(read_only=True)),
     "disk.0000: image is in use"),
    ("lock-sparse-twice", lock_case(sp(), sp()), "in use"),
    ("lock-split-seg-as-raw", lock_case(sp_split(), part("disk.0002", read_only=True)), "in use"),
    # vmrun image create
    ("create-negative", creates(-1), "size must be positive, not -1"),
    ("create-zero", creates(0), "size must be positive, not 0"),
    ("create-2**63", creates(1 << 63), "larger than the largest possible file"),
    ("create-2**64-sparse", creates(1 << 64, "sparse"), "larger than the largest possible file"),
    ("create-not-sector-multiple", creates(1000), "not a multiple of the sector size 512"),
    ("create-not-4k-multiple", creates(6144, sector_size=4096), "not a multiple of the sector"),
    ("create-sparse-not-multiple", creates(1000, "sparse"), "not a multiple of the sector size"),
    ("create-bad-sectorsize", creates(4096, "sparse", sector_size=1000), "power of two"),
    ("create-split-not-multiple", creates(8192, "raw", split=1000), "size 1000 is not a multiple"),
    ("create-split-zero", creates(8192, "sparse", split=0), "size must be positive, not 0"),
    ("create-str-size", creates("4096"), "is not a whole number of bytes"),
    ("create-float-size", creates(4096.0), "is not a whole number of bytes"),
    ("create-bad-format", creates(4096, "vmdk"), "unknown image format 'vmdk'"),
    ("create-existing", b_existing, "already exists"),
    # vmrun image convert
    ("convert-past-end", converts(b_entry(1, 3), src_split=4 * SS), "points at slot 3"),
    ("convert-duplicate", converts(b_entry(1, 0), src_split=4 * SS), "both point at slot 0"),
    ("convert-truncated", converts(b_truncate_seg(700), "sparse", src_split=4 * SS),
     "past the end"),
    ("convert-fifo", converts(b_raw_fifo), "disk image is a FIFO"),
    ("convert-lut-dir", converts(b_sparse_part("lut", replace_with_dir)),
     "LUT file is a directory"),
    ("convert-no-split", converts(lambda d: sparse(d)), "give split="),
    ("convert-missing", converts(lambda d: d / "none.img"), "no such disk image"),
    ("convert-self", b_convert_self, "is the source image"),
    ("convert-bad-sectorsize", converts(lambda d: raw(d), "sparse", sector_size=1000),
     "power of two"),
    ("convert-bad-split", converts(lambda d: raw(d), "sparse", split=1000), "split 1000 must be"),
    ("convert-write-fails", b_convert_write_fails, "cannot write at byte 0: No space left"),
    ("convert-sigterm", b_convert_killed(signal.SIGTERM), "interrupted by SIGTERM"),
    ("convert-sighup", b_convert_killed(signal.SIGHUP), "interrupted by SIGHUP"),
]


@pytest.mark.parametrize("build,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_image(tmp_path: Path, build: Build, fragment: str) -> None:
    d = tmp_path / "d"
    d.mkdir()
    action, held = build(d)
    before = snapshot(d)
    try:
        start = time.monotonic()
        with pytest.raises(VmrunError) as info:
            action()
        elapsed = time.monotonic() - start
    finally:
        for h in held:
            h.close()
        for s in _sockets:
            s.close()
        _sockets.clear()
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg and info.value.exit_code == 4
    assert elapsed < 5
    assert snapshot(d) == before


def test_sigint_mid_convert_leaves_nothing(tmp_path: Path) -> None:
    action, _ = b_convert_killed(signal.SIGINT)(tmp_path)
    before = snapshot(tmp_path)
    # Ctrl-C as an interactive user's Python sees it: a pytest started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then installs no handler.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            action()
    finally:
        signal.signal(signal.SIGINT, old)
    assert snapshot(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler put back


def test_lazy_check_fails_the_request_not_the_data(tmp_path: Path) -> None:
    """Opened without the scan (verify=False), a bad entry is an EIO, never other data."""
    base = b_entry(1, 3)(tmp_path)
    with SparseSplitDisk(base, split=4 * SS, verify=False) as disk:
        buf = memoryview(bytearray(2 * SS))
        with pytest.raises(OSError, match="corrupt LUT"):
            disk.readv(0, [buf])


def test_crash_debris_is_accepted(tmp_path: Path) -> None:
    """A partial sector at a segment's end that nothing points at (a crash mid-append)."""
    base = sparse(tmp_path, written=2)
    with open(segment_path(base, 0), "ab") as f:
        f.write(b"\x01" * 100)
    with SparseSplitDisk(base, split=4 * SS) as disk:
        disk.writev(2 * SS, [memoryview(b"\x07" * SS)])
        assert disk.problems() == []
    assert check_image(base, split=4 * SS) == []


def test_check_image(tmp_path: Path) -> None:
    assert check_image(tmp_path / "none") == [f"{tmp_path / 'none'}: no such disk image"]
    assert check_image(raw(tmp_path)) == []
    base = sparse(tmp_path, sectors=64, split=None, written=4)
    assert check_image(base) == []
    set_entry(base, 10, 2)
    set_entry(base, 20, 99)
    problems = check_image(base)
    assert len(problems) == 2
    assert "sectors 2 and 10 both point at slot 2" in problems[0]
    assert "sector 20 points at slot 99" in problems[1]
    for i in range(30, 60):
        set_entry(base, i, 1000 + i)
    problems = check_image(base)
    assert len(problems) == 21 and problems[-1].endswith("and 12 more bad entries")
    (tmp_path / "f").mkdir()
    assert "disk image is a FIFO" in check_image(b_raw_fifo(tmp_path / "f"))[0]
    other = tmp_path / "multi"
    other.mkdir()
    assert "give split=" in check_image(sparse(other))[0]
    assert check_image(other / "disk", split=4 * SS) == []


def test_created_helpers(tmp_path: Path) -> None:
    created: list[Path] = []
    open_disk(tmp_path / "a.img", size=8192, created=created).close()
    assert created == [tmp_path / "a.img"]
    open_disk(tmp_path / "a.img", size=8192, created=created).close()  # existed: not recorded
    assert created == [tmp_path / "a.img"]
    open_disk(tmp_path / "s", size=8 * SS, split=4 * SS, sparse=True, created=created).close()
    assert sorted(p.name for p in created) == ["a.img", "s.0000", "s.0001", "s.lut"]
    remove_created(created)
    assert created == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), disk_being_created() as made:
        open_disk(tmp_path / "b.img", size=4096, created=made).close()
        raise RuntimeError("later step failed")
    assert list(tmp_path.iterdir()) == []
    with disk_being_created() as made:
        open_disk(tmp_path / "c.img", size=4096, created=made).close()
    assert [p.name for p in tmp_path.iterdir()] == ["c.img"]


def test_big_lut_scan_is_fast(tmp_path: Path) -> None:
    """A 64 MiB LUT (16M sectors), all free, then written in order: the open-time scan."""
    base = tmp_path / "big"
    n = 16 << 20
    lut_path(base).write_bytes(b"\xff" * (4 * n))
    segment_path(base, 0).write_bytes(b"")
    # CPU time, not wall time: a loaded host slows the wall clock, not the scan's work
    # (a per-entry Python loop over 16M entries would take tens of CPU seconds).
    start = time.process_time()
    SparseSplitDisk(base, read_only=True).close()
    assert time.process_time() - start < 3
    import array
    with open(lut_path(base), "r+b") as f:
        for i in range(0, n, 1 << 20):
            f.write(array.array("I", range(i, i + (1 << 20))).tobytes())
    os.truncate(segment_path(base, 0), n * SS)
    start = time.process_time()
    SparseSplitDisk(base, read_only=True).close()
    assert time.process_time() - start < 5


def test_cli_exit_4(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vmrun.cli import main

    runner = CliRunner()
    base = b_entry(1, 3)(tmp_path)
    before = snapshot(tmp_path)
    for args, fragment in (
        (["image", "create", str(tmp_path / "x.img"), "--size", "0"], "size must be positive"),
        (["image", "create", str(tmp_path / "x.img"), "--size", "1000"], "not a multiple"),
        (["image", "create", str(tmp_path / "x.img"), "--size", "16777216T"],
         "larger than the largest"),
        (["image", "convert", str(base), str(tmp_path / "y.img"), "--to", "raw",
          "--src-split", "2048"], "points at slot 3"),
    ):
        result = runner.invoke(main, args)
        out = result.output
        try:
            out += result.stderr
        except (ValueError, AttributeError):
            pass
        assert result.exit_code == 4, (args, out)
        assert fragment in out
    assert snapshot(tmp_path) == before
