"""KVM tests with native guests: small C programs that run in guest user mode (so they are
fast even where KVM emulates guest kernel code) and drive a device like a driver would.

``vblk`` sets up a virtio-blk function through its PCI capabilities, then reads and writes
sequentially (1 MiB) and at random (4 KiB, 32 in flight), polling the used ring in guest
memory while vmrun's worker threads complete requests: this is what caught the used index
being published with a non-atomic store.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun.testing import native

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed"),
]
SECTORS = 32 * 2048          # a 32 MiB disk
PATTERN = 0xAB000000         # sector s starts with PATTERN + s until the guest writes it


def make_disk(path: Path) -> None:
    data = bytearray(SECTORS * 512)
    for s in range(SECTORS):
        struct.pack_into("<Q", data, s * 512, PATTERN + s)
    path.write_bytes(data)


def run_vblk(tmp_path: Path, cmdline: str, disk_options: str = "") -> tuple[int, str]:
    disk = tmp_path / "disk.img"
    if not disk.exists():
        make_disk(disk)
    log = tmp_path / "debugcon.log"
    machine = tmp_path / "vblk.toml"
    machine.write_text(f'''name = "vblk"
cpus = 1
memory = "128M"
on_reboot = "exit"
[boot]
kernel = "{native.build("vblk")}"
cmdline = "{cmdline}"
[serial.debugcon]
backend = "file"
path = "{log}"
[devices.disk]
model = "virtio-blk"
path = "{disk}"
{disk_options}
''')
    out = subprocess.run([sys.executable, "-m", "vmrun", "up", str(machine)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    return out.returncode, log.read_text() + out.stderr


@pytest.mark.parametrize("nocache", [False, True], ids=["threads", "native-aio"])
def test_vblk_guest_reads_and_writes_where_it_says(tmp_path: Path, nocache: bool) -> None:
    rc, text = run_vblk(tmp_path, "seq_mib=8 rand_ios=4000 qd=32",
                        "nocache = true" if nocache else "")
    assert "vblk: done" in text, text[-2000:]
    assert rc == 0, text[-2000:]                       # debug-exit 0 with on_reboot = "exit"
    assert f"vblk: capacity={SECTORS} " in text
    assert f"vblk: sector 0 starts with {PATTERN}" in text   # as the host wrote it
    for line in ("end read ios=8 bytes=8388608", "end write ios=8 bytes=8388608",
                 "end randread ios=4000 bytes=16384000", "end randwrite ios=4000"):
        assert line in text, line
    data = (tmp_path / "disk.img").read_bytes()
    firsts = [struct.unpack_from("<Q", data, s * 512)[0] for s in range(SECTORS)]
    assert firsts[:8 * 2048] == list(range(8 * 2048))  # the sequential write, in place
    rest = firsts[8 * 2048:]
    assert all(v in (s, PATTERN + s) for s, v in enumerate(rest, start=8 * 2048))
    assert sum(v == s for s, v in enumerate(rest, start=8 * 2048)) > 1000   # random writes


def test_vblk_guest_gets_an_io_error_from_a_read_only_disk(tmp_path: Path) -> None:
    rc, text = run_vblk(tmp_path, "seq_mib=1 tests=rw", "ro = true")
    assert "end read ios=1" in text, text[-2000:]
    assert "vblk: error: request failed with status 0x0000000000000001" in text   # IOERR
    assert rc == 1
    data = (tmp_path / "disk.img").read_bytes()
    assert struct.unpack_from("<Q", data, 0)[0] == PATTERN
