"""The default guest's own tools, built and tried on the host: ``blkbench`` (the block
benchmark's fio stand-in) and the initramfs that carries it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vmrun.errors import VmrunError
from vmrun.image import GUEST_DIR, build_initramfs, busybox_applets, compile_static

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
LINE = re.compile(r"blkbench: (\w+) bs=(\d+) qd=(\d+) ios=(\d+) bytes=(\d+) usecs=(\d+) "
                  r"iops=(\d+) kbps=(\d+)")


@pytest.fixture(scope="module")
def blkbench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("bb") / "blkbench"
    exe.write_bytes(compile_static(GUEST_DIR / "blkbench.c"))
    exe.chmod(0o755)
    return exe


def run(exe: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_blkbench_is_static(blkbench: Path) -> None:
    assert b"\x7fELF" == blkbench.read_bytes()[:4]
    assert b"ld-linux" not in blkbench.read_bytes()[:4096]      # no PT_INTERP


def test_blkbench_sequential_and_random(blkbench: Path) -> None:
    disk = Path("/var/tmp") / f"blkbench-{id(blkbench)}.img"    # tmpfs has no O_DIRECT
    try:
        disk.write_bytes(b"\0" * (8 << 20))
        out = run(blkbench, "write", disk, 1 << 20, 1, 4)
        m = LINE.search(out.stdout)
        assert out.returncode == 0 and m, out.stderr
        assert m.group(1) == "write" and int(m.group(4)) == 4 and int(m.group(5)) == 4 << 20
        assert disk.read_bytes()[:4 << 20] == b"\x5a" * (4 << 20)
        out = run(blkbench, "randread", disk, 4096, 32, 1)
        m = LINE.search(out.stdout)
        assert out.returncode == 0 and m, out.stderr
        assert (m.group(2), m.group(3)) == ("4096", "32") and int(m.group(4)) > 32
        assert int(m.group(7)) > 0
        # Bad arguments and a device too small for the request: exit 2 with a message.
        for args in (("read", disk, 1000, 1, 1), ("read", disk, 4096, 0, 1),
                     ("read", disk, 1 << 20, 1, 9)):
            out = run(blkbench, *args)
            assert out.returncode == 2 and out.stderr.startswith("blkbench:"), args
        out = run(blkbench, "read", disk.with_suffix(".missing"), 4096, 1, 1)
        assert out.returncode == 1 and "No such file" in out.stderr
    finally:
        disk.unlink(missing_ok=True)


def _cpio_members(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc cpio, parsed here (a reader nobody else wrote: the
    format's own field layout)."""
    out, at = {}, 0
    while True:
        assert data[at:at + 6] == b"070701", at
        mode = int(data[at + 14:at + 22], 16)
        size = int(data[at + 54:at + 62], 16)
        namesize = int(data[at + 94:at + 102], 16)
        name = data[at + 110:at + 110 + namesize - 1].decode()
        at += 110 + namesize
        at += -at % 4
        body = data[at:at + size]
        at += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_initramfs_carries_extra_executables_and_applet_links() -> None:
    data = build_initramfs(Path("/bin/sh"), b"#!/bin/sh\n", {"bin/blkbench": b"\x7fELF-test"},
                           ["bin/ls", "usr/sbin/httpd", "bin/sh", "nodir/x", "linuxrc"])
    assert data[:6] == b"070701"                    # not compressed: the kernel copies it
    members = _cpio_members(data)
    assert members["bin/blkbench"] == (0o100755, b"\x7fELF-test")
    assert members["bin/ls"] == (0o120777, b"/bin/busybox")
    assert members["usr/sbin/httpd"] == (0o120777, b"/bin/busybox")
    assert members["linuxrc"] == (0o120777, b"/bin/busybox")
    assert members["bin/sh"] == (0o120777, b"busybox")      # the one link made first stays
    assert "nodir/x" not in members                  # no directory for it in the image
    assert shutil.which("cpio") is None or subprocess.run(
        ["cpio", "-t"], input=data, capture_output=True).stdout.split().count(b"bin/ls") == 1


def test_busybox_lists_its_applets() -> None:
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed (make deps)")
    applets = busybox_applets(Path("/bin/busybox"))
    assert "bin/sh" in applets and "sbin/poweroff" in applets and "bin/ls" in applets


def test_compile_errors_are_one_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.c"
    bad.write_text("int main( {\n")
    with pytest.raises(VmrunError, match="bad.c did not compile"):
        compile_static(bad)
