"""qcow2 images against QEMU's own tools (issue 12).

Images made by ``qemu-img``/``qemu-io`` (v2 and v3, cluster sizes 512 to 2M, compressed, zero
clusters, overlays and chains) must read back byte for byte as ``qemu-img convert -O raw``
reads them; images vmrun writes must pass ``qemu-img check`` and ``qemu-img compare`` equal to
what was written; a SIGKILL after a flush loses nothing flushed; and a hostile image (header,
L1, L2 and refcount bytes mutated by hypothesis) is either read correctly or answered with a
one-line VmrunError or an I/O error, never another exception or a hang.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrun.block import open_disk
from vmrun.block.image_tools import check_image, convert_image, create_image, info_lines
from vmrun.block.qcow2 import Qcow2Image
from vmrun.block.qcow2_check import check_qcow2, create_qcow2
from vmrun.block.queue import BlockQueue
from vmrun.errors import VmrunError

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or
                                shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io missing: make deps installs qemu-utils")


@pytest.fixture
def d() -> Iterator[Path]:
    """A folder on a real filesystem (O_DIRECT needs one; tmpfs refuses it)."""
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else None
    p = Path(tempfile.mkdtemp(prefix="vmrun-qcow2-", dir=base))
    yield p
    shutil.rmtree(p, ignore_errors=True)


def qemu_img(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True,
                          text=True)


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def as_raw(path: Path) -> bytes:
    """The guest's disk as QEMU reads it."""
    out = path.with_name(path.name + ".oracle.raw")
    qemu_img("convert", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def read_all(disk) -> bytes:
    buf = bytearray(disk.size)
    view = memoryview(buf)
    # In uneven pieces, so requests start and end inside clusters.
    pos, step = 0, 0
    sizes = (4096, 512, 65536 + 512, 1 << 20, 3072)
    while pos < disk.size:
        n = min(sizes[step % len(sizes)], disk.size - pos)
        disk.readv(pos, [view[pos:pos + n]])
        pos += n
        step += 1
    return bytes(buf)


def qemu_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)


def assert_clean(path: Path) -> None:
    r = qemu_check(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert check_qcow2(path) == []


# -- images QEMU made, read by vmrun -------------------------------------------------------------

@pytest.mark.parametrize("cluster", ["512", "4k", "64k", "2M"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_reads_what_qemu_io_wrote(d: Path, cluster: str, compat: str) -> None:
    p = d / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster},compat={compat}", p, "8M")
    qemu_io(p, "write -P 0xab 0 64k", "write -P 0x11 1000k 3k", "write -P 0x22 4095k 2k",
            "write -P 0x33 8188k 4k", "write -z 1024k 8k", "discard 0 4k")
    want = as_raw(p)
    assert want[8 * MiB - 4096:] == b"\x33" * 4096
    with open_disk(p, read_only=True) as disk:
        assert isinstance(disk, Qcow2Image)
        assert disk.version == (2 if compat == "0.10" else 3)
        assert disk.size == 8 * MiB
        assert read_all(disk) == want


@pytest.mark.parametrize("cluster", ["512", "64k"])
def test_reads_compressed_clusters(d: Path, cluster: str) -> None:
    src = d / "src.raw"
    rnd = random.Random(1)
    data = bytearray(4 * MiB)
    for _ in range(40):
        off = rnd.randrange(0, 4 * MiB - 70000)
        data[off:off + 65536] = bytes([rnd.randrange(256)]) * 30000 + rnd.randbytes(35536)
    src.write_bytes(data)
    p = d / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster}", src, p)
    with open_disk(p, read_only=True) as disk:
        assert read_all(disk) == bytes(data)
        assert "compressed clusters" in " ".join(info_lines(p))
    # A write over a compressed cluster makes a fresh copy of the rest of it.
    with open_disk(p) as disk:
        disk.writev(100, [memoryview(b"\xee" * 1000)])
        data[100:1100] = b"\xee" * 1000
    assert_clean(p)
    assert as_raw(p) == bytes(data)


def test_overlays_and_chains(d: Path) -> None:
    base = d / "base.raw"
    base.write_bytes(b"\x01" * (2 * MiB))                     # raw base, smaller than the top
    mid = d / "sub" / "mid.qcow2"
    mid.parent.mkdir()
    qemu_img("create", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", mid, "4M")
    qemu_io(mid, "write -P 0x02 1M 64k", "write -z 1536k 64k")
    top = d / "sub" / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", "-b", "mid.qcow2",
             "-F", "qcow2", top)
    qemu_io(top, "write -P 0x03 1056k 8k", "write -P 0x04 3M 4k")
    want = as_raw(top)
    assert want[:4096] == b"\x01" * 4096 and want[3 * MiB - 4096:3 * MiB] == bytes(4096)
    with open_disk(top, read_only=True) as disk:
        assert [p.name for p, _ in disk.chain()] == ["top.qcow2", "mid.qcow2", "base.raw"]
        assert read_all(disk) == want
    # vmrun writes the top only: the base files do not change.
    before = (base.read_bytes(), mid.read_bytes())
    with open_disk(top) as disk:
        disk.writev(MiB + 2048, [memoryview(b"\x05" * 70000)])
        disk.write_zeroes(0, 8192, unmap=False)                 # v2: zeros written over base
        disk.discard(1536 * 1024 + 4096, 4096)
    expect = bytearray(want)
    expect[MiB + 2048:MiB + 2048 + 70000] = b"\x05" * 70000
    expect[0:8192] = bytes(8192)
    expect[1536 * 1024 + 4096:1536 * 1024 + 8192] = bytes(4096)
    assert (base.read_bytes(), mid.read_bytes()) == before
    assert_clean(top)
    assert as_raw(top) == bytes(expect)
    assert check_image(top) == []
    lines = info_lines(top)
    assert any("backing chain 2" in line and "base.raw (raw)" in line for line in lines)


def test_v3_zero_clusters_hide_the_backing_file(d: Path) -> None:
    base = d / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 0x77 0 1M")
    top = d / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    with open_disk(top) as disk:
        disk.write_zeroes(65536, 2 * 65536, unmap=True)
        disk.write_zeroes(4 * 65536, 65536, unmap=False)
        disk.discard(6 * 65536 + 100, 65536)                   # partial ends are zeroed too
    want = bytearray(b"\x77" * MiB)
    want[65536:3 * 65536] = bytes(2 * 65536)
    want[4 * 65536:5 * 65536] = bytes(65536)
    want[6 * 65536 + 100:7 * 65536 + 100] = bytes(65536)
    assert_clean(top)
    assert as_raw(top) == bytes(want)
    with open_disk(top, read_only=True) as disk:
        assert read_all(disk) == bytes(want)


# -- images vmrun writes, checked by QEMU ----------------------------------------------------------

def random_writes(disk, size: int, rnd: random.Random, count: int, mirror: bytearray) -> None:
    for i in range(count):
        n = rnd.choice((512, 4096, 65536, 200 * 1024, 1536 * 1024)) if i % 5 else \
            rnd.randrange(1, 8) * 512
        off = rnd.randrange(0, (size - n) // 512 + 1) * 512
        if i % 7 == 3:
            zeroes = rnd.random() < 0.5
            (disk.write_zeroes(off, n, unmap=zeroes) if i % 2 else disk.discard(off, n))
            mirror[off:off + n] = bytes(n)
            continue
        data = rnd.randbytes(n)
        # Several guest buffers per request, as a virtqueue hands them over.
        views = [memoryview(data)[k:k + 1536] for k in range(0, n, 1536)]
        disk.writev(off, views)
        mirror[off:off + n] = data
        if i % 17 == 0:
            disk.flush()


@pytest.mark.parametrize("cluster,version", [(512, 3), (4096, 2), (65536, 3), (65536, 2),
                                             (2 << 20, 3)])
def test_vmrun_writes_pass_qemu_img_check(d: Path, cluster: int, version: int) -> None:
    p = d / "w.qcow2"
    size = 12 * MiB
    create_qcow2(p, size, cluster_size=cluster, version=version)
    assert_clean(p)
    mirror = bytearray(size)
    with open_disk(p) as disk:
        random_writes(disk, size, random.Random(cluster + version), 60, mirror)
        assert read_all(disk) == bytes(mirror)
    assert_clean(p)
    assert as_raw(p) == bytes(mirror)


def test_small_caches_evict_in_order(d: Path) -> None:
    """With a tiny L2 cache every table is written back early; the image stays consistent."""
    p = d / "e.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", p, "16M")
    mirror = bytearray(16 * MiB)
    disk = Qcow2Image(p, l2_cache_bytes=2048)
    try:
        random_writes(disk, 16 * MiB, random.Random(5), 80, mirror)
    finally:
        disk.close()
    assert_clean(p)
    assert as_raw(p) == bytes(mirror)


def test_overlay_of_a_qemu_base(d: Path) -> None:
    base = d / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", base, "6M")
    qemu_io(base, "write -P 0x61 0 6M")
    top = d / "top.qcow2"
    create_image(top, None, "qcow2", backing="base.qcow2")
    assert qemu_img("info", top).stdout.count("backing file: base.qcow2") == 1
    mirror = bytearray(as_raw(base))
    with open_disk(top) as disk:
        random_writes(disk, 6 * MiB, random.Random(9), 40, mirror)
    assert_clean(top)
    assert as_raw(top) == bytes(mirror)
    r = subprocess.run(["qemu-img", "compare", str(top), str(base)], capture_output=True)
    assert r.returncode == 1                                  # the overlay differs: written


def test_convert_between_all_formats(d: Path) -> None:
    src = d / "src.raw"
    data = bytearray(5 * MiB)
    data[:1000] = b"\x01" * 1000
    data[3 * MiB:3 * MiB + 70000] = random.Random(3).randbytes(70000)
    src.write_bytes(data)
    convert_image(src, d / "a.qcow2", "qcow2", cluster_size=4096)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src),
                        str(d / "a.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert_clean(d / "a.qcow2")
    convert_image(d / "a.qcow2", d / "b", "sparse", split=2 * MiB)
    convert_image(d / "b", d / "c.qcow2", "qcow2", src_split=2 * MiB)
    convert_image(d / "c.qcow2", d / "d.raw", "raw")
    assert (d / "d.raw").read_bytes() == bytes(data)
    # Only what the source holds is stored.
    with Qcow2Image(d / "c.qcow2", read_only=True) as img:
        from vmrun.block.qcow2_check import scan

        assert scan(img).allocated_clusters == 3          # 64K clusters: 0, 48 and 49
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_convert_to_qcow2_killed_leaves_nothing(d: Path) -> None:
    src = d / "src.raw"
    src.write_bytes(os.urandom(3 * MiB))

    def progress(done: int, total: int) -> None:
        if done >= MiB:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)

    with pytest.raises(VmrunError, match="interrupted by SIGTERM"):
        convert_image(src, d / "out.qcow2", "qcow2", progress=progress)
    assert sorted(p.name for p in d.iterdir()) == ["src.raw"]


def test_cli_create_info_check(d: Path) -> None:
    vmrun = [sys.executable, "-m", "vmrun"]
    run = lambda *a: subprocess.run([*vmrun, *map(str, a)], capture_output=True, text=True)
    r = run("image", "create", d / "base.qcow2", "--format", "qcow2", "--size", "4M",
            "--cluster-size", "4K")
    assert r.returncode == 0, r.stderr
    r = run("image", "create", d / "top.qcow2", "--format", "qcow2", "--backing", "base.qcow2")
    assert r.returncode == 0, r.stderr
    r = run("image", "info", d / "top.qcow2")
    assert r.returncode == 0, r.stderr
    assert "format: qcow2 (version 3)" in r.stdout and "virtual size: 4.0 MiB" in r.stdout
    assert "cluster size: 65536" in r.stdout and "base.qcow2 (qcow2)" in r.stdout
    assert run("image", "check", d / "top.qcow2").stdout == "ok\n"
    r = run("image", "create", d / "x.qcow2", "--format", "qcow2", "--backing", "none.qcow2")
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "no such disk image" in r.stderr
    # A leak and a corruption: one line each, exit 4.
    p = d / "base.qcow2"
    with Qcow2Image(p) as img:
        img.writev(0, [memoryview(b"\x01" * 8192)])
    raw = bytearray(p.read_bytes())
    rb = struct.unpack(">Q", raw[4096:4104])[0]               # refcount block 0
    used = [i for i in range(0, 4096, 2) if raw[rb + i:rb + i + 2] != b"\0\0"]
    raw[rb + used[-1]:rb + used[-1] + 2] = b"\0\0"           # the last data cluster: uncounted
    raw[rb + used[-1] + 2:rb + used[-1] + 4] = b"\0\1"      # the next, unused one: counted
    p.write_bytes(raw)
    r = run("image", "check", p)
    assert r.returncode == 4
    lines = r.stderr.splitlines()
    assert all(line.startswith(f"vmrun: {p}: ") for line in lines), r.stderr
    assert sum("(corrupt)" in line for line in lines) == 1, r.stderr
    assert sum("leaked cluster" in line for line in lines) == 1, r.stderr
    assert qemu_check(p).returncode == 2                      # QEMU agrees: corrupt


# -- durability: SIGKILL ---------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, random, sys, time
    from vmrun.block import open_disk
    path, seed, more = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    rnd = random.Random(seed)
    disk = open_disk(path)
    mirror = bytearray(disk.size)
    for i in range(60):
        n = rnd.choice((512, 4096, 65536, 300000 // 512 * 512))
        off = rnd.randrange(0, (disk.size - n) // 512) * 512
        data = rnd.randbytes(n)
        disk.writev(off, [memoryview(data)])
        mirror[off:off + n] = data
    disk.flush()
    open(path + ".flushed", "wb").write(mirror)
    os.write(1, b"flushed\\n")
    while more:   # unflushed allocating writes until the kill, each announced first
        n = rnd.choice((512, 65536))
        off = rnd.randrange(0, (disk.size - n) // 512) * 512
        os.write(1, f"{off} {n}\\n".encode())    # one write(2): never half a line at the kill
        disk.writev(off, [memoryview(rnd.randbytes(n))])
    time.sleep(60)
""")


@pytest.mark.parametrize("more", [False, True])
def test_sigkill_after_flush_loses_nothing(d: Path, more: bool) -> None:
    p = d / "k.qcow2"
    base = d / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", base, "8M")
    qemu_io(base, "write -P 0x5a 0 8M")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F",
             "qcow2", p)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(p), "7", "1" if more else "0"],
                            stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"flushed\n"
    if more:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = qemu_check(p)
    # Flushed and then killed: clean. Killed amid unflushed allocations: at most leaks (3).
    assert r.returncode in ((0, 3) if more else (0,)), r.stdout + r.stderr
    got = bytearray(as_raw(p))
    want = bytearray(_overlay((d / "k.qcow2.flushed").read_bytes(), b"\x5a"))
    # Whatever was written after the flush may or may not be there; everything else must.
    proc_out = proc.stdout.read()
    for line in proc_out.split(b"\n") if more else []:
        if line.strip():
            assert len(line.split()) == 2, proc_out    # every announcement whole
            off, n = map(int, line.split())
            got[off:off + n] = want[off:off + n]
    assert got == want
    with open_disk(p) as disk:                                # still opens and writes
        disk.writev(0, [memoryview(b"x" * 512)])
    assert qemu_check(p).returncode in (0, 3)


def _overlay(written: bytes, fill: bytes) -> bytes:
    """The writer records every byte it wrote (zeros elsewhere); the base shows through
    where it wrote nothing. Its random data is never a whole zero sector."""
    out = bytearray(written)
    for s in range(0, len(out), 512):
        if out[s:s + 512] == bytes(512):
            out[s:s + 512] = fill * 512
    return bytes(out)


# -- options and refusals ------------------------------------------------------------------------

def test_options_as_with_raw(d: Path) -> None:
    p = d / "o.qcow2"
    qemu_img("create", "-f", "qcow2", p, "4M")
    with open_disk(p, read_only=True) as disk:
        with pytest.raises(PermissionError):
            disk.writev(0, [memoryview(b"x" * 512)])
        assert not disk.supports_discard
        with pytest.raises(VmrunError, match="in use"):
            open_disk(p)
    with open_disk(p, discard=False) as disk:
        assert not disk.supports_discard
        with pytest.raises(OSError):
            disk.discard(0, 65536)
    import mmap
    buf = memoryview(mmap.mmap(-1, 2 * MiB))
    buf[:] = b"\x42" * (2 * MiB)
    with open_disk(p, nocache=True, sync=True, sector_size=(512, 4096)) as disk:
        assert disk.physical_sector_size == 4096
        disk.writev(MiB, [buf[:MiB]])
        disk.writev(4096, [buf[5:517]])                        # unaligned: the buffered fd
        out = memoryview(mmap.mmap(-1, MiB))
        disk.readv(MiB, [out])
        assert out == buf[:MiB]
    assert_clean(p)
    with pytest.raises(VmrunError, match="image is 4194304 bytes but size=8192"):
        open_disk(p, size=8192)


def test_block_queue_uses_the_workers(d: Path) -> None:
    p = d / "q.qcow2"
    qemu_img("create", "-f", "qcow2", p, "4M")
    from vmrun.core.dma import SgList
    from vmrun.core.memory import GuestMemory

    mem = GuestMemory([(0, 4 * MiB)], huge_pages=False)
    try:
        disk = open_disk(p, nocache=True)
        q = BlockQueue(disk, None, workers=2)
        results: list[int] = []
        mem.write(0, b"\x17" * 8192)
        q.write(65536, SgList(mem, [(0, 4096), (4096, 4096)]), results.append)
        q.submit()
        assert q.drain(10)
        q.flush(results.append)
        assert q.drain(10)
        q.read(65536, SgList(mem, [(MiB, 8192)]), results.append)
        q.submit()
        assert q.drain(10)
        # The write needed a new cluster (a worker); the read of it went out as native AIO.
        assert q.aio is None or q.aio_submitted == 1
        q.close()
        assert disk.direct_map(65536, 8192, True) is not None
        assert disk.direct_map(0, 4096, False) is None              # unallocated
        assert disk.direct_map(65536 - 512, 1024, False) is None    # half unallocated
        disk.close()
        assert results == [8192, 0, 8192]
        assert mem.read(MiB, 8192) == b"\x17" * 8192
    finally:
        mem.close()
    assert_clean(p)


def corrupt_header(p: Path, offset: int, value: bytes) -> None:
    raw = bytearray(p.read_bytes())
    raw[offset:offset + len(value)] = value
    p.write_bytes(raw)


def one_line_error(fn) -> str:
    with pytest.raises(VmrunError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refusals_are_one_line(d: Path) -> None:
    p = d / "r.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    ext = d / "ext.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", ext, "1M")
    assert "extended L2" in one_line_error(lambda: open_disk(ext))
    q = d / "unknown.qcow2"
    shutil.copy(p, q)
    corrupt_header(q, 72, struct.pack(">Q", 1 << 40))
    assert "unsupported qcow2 feature(s): bit 40" in one_line_error(lambda: open_disk(q))
    q = d / "corrupt.qcow2"
    shutil.copy(p, q)
    corrupt_header(q, 72, struct.pack(">Q", 2))
    assert "marked corrupt" in one_line_error(lambda: open_disk(q))
    open_disk(q, read_only=True).close()                     # as QEMU: readable
    assert "corrupt bit" in check_image(q)[0]
    q = d / "crypt.qcow2"
    shutil.copy(p, q)
    corrupt_header(q, 32, struct.pack(">I", 2))
    assert "encrypted" in one_line_error(lambda: open_disk(q))
    q = d / "zstd.qcow2"
    shutil.copy(p, q)
    corrupt_header(q, 72, struct.pack(">Q", 8))
    corrupt_header(q, 104, b"\x01")
    assert "zstd" in one_line_error(lambda: open_disk(q))
    q = d / "v4.qcow2"
    shutil.copy(p, q)
    corrupt_header(q, 4, struct.pack(">I", 4))
    assert "version 4" in one_line_error(lambda: open_disk(q))
    # Snapshots: read-only is fine, writing is refused.
    q = d / "snap.qcow2"
    shutil.copy(p, q)
    qemu_io(q, "write -P 0x09 0 64k")
    qemu_img("snapshot", "-c", "s1", q)
    qemu_io(q, "write -P 0x0a 0 4k")
    assert "internal snapshot" in one_line_error(lambda: open_disk(q))
    with open_disk(q, read_only=True) as disk:
        assert read_all(disk) == as_raw(q)
    assert check_qcow2(q) == []


def test_backing_chain_refusals(d: Path) -> None:
    a, b = d / "a.qcow2", d / "b.qcow2"
    qemu_img("create", "-f", "qcow2", a, "1M")
    qemu_img("create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)  # a -> b -> a
    assert "loops" in one_line_error(lambda: open_disk(a))
    c = d / "c.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", c, "1M")
    assert "gone.qcow2: no such disk image" in one_line_error(lambda: open_disk(c))
    prev = "base.raw"
    (d / prev).write_bytes(bytes(MiB))
    for i in range(40):
        name = f"l{i}.qcow2"
        qemu_img("create", "-f", "qcow2", "-u", "-b", prev, "-F",
                 "raw" if i == 0 else "qcow2", d / name, "1M")
        prev = name
    assert "deeper than" in one_line_error(lambda: open_disk(d / prev, read_only=True))
    u = d / "url.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "nbd://host/x", "-F", "raw", u, "1M")
    assert "not a local file" in one_line_error(lambda: open_disk(u))


def test_dirty_image_is_repaired_on_open(d: Path) -> None:
    p = d / "dirty.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", p, "2M")
    qemu_io(p, "write -P 0x31 0 256k")
    raw = bytearray(p.read_bytes())
    raw[72:80] = struct.pack(">Q", 1)                          # dirty
    rb = struct.unpack(">Q", raw[4096:4104])[0]
    raw[rb + 2 * 20:rb + 2 * 30] = bytes(20)                   # ten counts lost
    p.write_bytes(raw)
    assert any("(corrupt)" in line for line in check_qcow2(p))  # undercounted clusters
    with open_disk(p, read_only=True) as disk:                 # read-only: left as it is
        assert disk.dirty
    with open_disk(p) as disk:
        assert not disk.dirty
        disk.writev(MiB, [memoryview(b"\x32" * 65536)])
    assert_clean(p)
    want = b"\x31" * 262144 + bytes(MiB - 262144) + b"\x32" * 65536 + bytes(MiB - 65536)
    assert as_raw(p) == want


# -- hostile images ------------------------------------------------------------------------------

_HOSTILE_BASE: dict[str, bytes] = {}


def _hostile_base() -> bytes:
    """A small v3 image with 512-byte clusters: L2 tables, data, compressed and zero
    clusters, several refcount blocks."""
    if "img" not in _HOSTILE_BASE:
        with tempfile.TemporaryDirectory() as t:
            src = Path(t) / "s.raw"
            data = bytearray(256 * 1024)
            data[0:20000] = random.Random(2).randbytes(20000)
            data[100000:140000] = b"\x44" * 40000
            src.write_bytes(data)
            p = Path(t) / "h.qcow2"
            qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=512", src, p)
            qemu_io(p, "write -P 0x66 200k 8k", "write -z 160k 4k")
            _HOSTILE_BASE["img"] = p.read_bytes()
            _HOSTILE_BASE["raw"] = as_raw(p)
    return _HOSTILE_BASE["img"]


@settings(max_examples=int(os.environ.get("VMRUN_QCOW2_FUZZ", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2 ** 32 - 1), st.integers(0, 255)), min_size=1,
                max_size=12),
       st.sampled_from(["header", "anywhere", "fields"]),
       st.booleans())
def test_hostile_images(d: Path, edits: list[tuple[int, int]], where: str,
                        writable: bool) -> None:
    img = bytearray(_hostile_base())
    n = len(img)
    fields = (4, 20, 24, 32, 36, 40, 48, 56, 60, 64, 72, 80, 88, 96, 100, 104)
    for pos, value in edits:
        if where == "header":
            at = pos % 512
        elif where == "fields":
            at = fields[pos % len(fields)] + (pos >> 8) % 8
        else:
            at = pos % n
        img[at] = value
    p = d / f"h{random.randrange(1 << 30)}.qcow2"
    p.write_bytes(bytes(img))
    t0 = time.monotonic()
    try:
        disk = open_disk(p, read_only=not writable)
    except VmrunError as e:
        assert "\n" not in str(e)
        return
    try:
        size = disk.size
        assert size <= 1 << 61
        buf = memoryview(bytearray(min(size, 512 * 1024)))
        try:
            disk.readv(0, [buf])
            if img == _hostile_base():
                assert bytes(buf) == _HOSTILE_BASE["raw"]
        except OSError:
            pass
        if writable:
            for off, length in ((0, 4096), (min(size, 300000) - 512, 512),
                                (size - 4096, 4096)):
                try:
                    disk.writev(max(0, off), [memoryview(b"\x99" * length)])
                except OSError:
                    pass
            try:
                disk.discard(0, min(size, 8192))
            except OSError:
                pass
            try:
                disk.flush()
            except OSError:
                pass
    finally:
        disk.close()
    assert p.stat().st_size < 64 * MiB                     # nothing huge was written
    assert time.monotonic() - t0 < 30
    for line in check_qcow2(p):
        assert "\n" not in line


def test_guest_data_never_overwrites_tables(d: Path) -> None:
    """An L2 entry that points at the L1 table: the write is an I/O error and the image is
    marked corrupt (QEMU's overlap check), so it then opens read-only only."""
    p = d / "overlap.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    qemu_io(p, "write -P 0x01 0 64k")
    raw = bytearray(p.read_bytes())
    l1_off = struct.unpack(">Q", raw[40:48])[0]
    l2_off = struct.unpack(">Q", raw[l1_off:l1_off + 8])[0] & 0x00FFFFFFFFFFFE00
    raw[l2_off:l2_off + 8] = struct.pack(">Q", l1_off | 1 << 63)
    p.write_bytes(raw)
    before = p.read_bytes()[l1_off:l1_off + 512]
    with open_disk(p) as disk:
        with pytest.raises(OSError) as e:
            disk.writev(0, [memoryview(b"\x02" * 4096)])
        assert "metadata cluster" in str(e.value)
        with pytest.raises(OSError):
            disk.writev(65536, [memoryview(b"\x02" * 4096)])      # no more writes at all
    assert p.read_bytes()[l1_off:l1_off + 512] == before
    assert "marked corrupt" in one_line_error(lambda: open_disk(p))
    open_disk(p, read_only=True).close()


def test_create_and_convert_refusals(d: Path) -> None:
    src = d / "s.raw"
    src.write_bytes(bytes(MiB))
    cases = [
        (lambda: create_image(d / "a.qcow2", MiB, "qcow2", cluster_size=3072),
         "a.qcow2: cluster size 3072 must be a power of two"),
        (lambda: create_image(d / "b.qcow2", MiB, "qcow2", split=65536), "cannot be split"),
        (lambda: create_image(d / "c.img", MiB, "raw", backing="s.raw"),
         "--backing and --cluster-size are for qcow2"),
        (lambda: create_image(d / "d.qcow2", None, "qcow2"), "give the size"),
        (lambda: convert_image(src, d / "e.qcow2", "qcow2", cluster_size=4 << 20),
         "e.qcow2: cluster size"),
        (lambda: convert_image(src, d / "f.img", "raw", cluster_size=65536),
         "--cluster-size is for qcow2"),
    ]
    for action, fragment in cases:
        assert fragment in one_line_error(action)
    assert sorted(p.name for p in d.iterdir()) == ["s.raw"]
    # A raw base, the overlay's size taken from it.
    create_image(d / "o.qcow2", None, "qcow2", backing="s.raw")
    with open_disk(d / "o.qcow2", read_only=True) as disk:
        assert disk.size == MiB and disk.chain()[1] == (src, "raw")
