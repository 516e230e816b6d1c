"""KVM test with the native ``vahci`` guest (vmrun/testing/native/vahci.c): a small AHCI
driver in guest user mode resets the controller, IDENTIFYs the disk and runs NCQ reads and
writes, 32 tags in flight, against ``ahci-hd``; the host checks where the data went."""

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
SECTORS = 32 * 2048
PATTERN = 0xAB000000


def run_vahci(tmp_path: Path, cmdline: str, disk_options: str = "") -> tuple[int, str]:
    disk = tmp_path / "disk.img"
    if not disk.exists():
        data = bytearray(SECTORS * 512)
        for s in range(SECTORS):
            struct.pack_into("<Q", data, s * 512, PATTERN + s)
        disk.write_bytes(data)
    log = tmp_path / "debugcon.log"
    machine = tmp_path / "vahci.toml"
    machine.write_text(f'''name = "vahci"
cpus = 1
memory = "128M"
on_reboot = "exit"
[boot]
kernel = "{native.build("vahci")}"
cmdline = "{cmdline}"
[serial.debugcon]
backend = "file"
path = "{log}"
[devices.disk]
model = "ahci-hd"
path = "{disk}"
{disk_options}
''')
    out = subprocess.run([sys.executable, "-m", "vmrun", "up", str(machine)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    return out.returncode, log.read_text() + out.stderr


@pytest.mark.parametrize("nocache", [False, True], ids=["threads", "native-aio"])
def test_vahci_guest_reads_and_writes_where_it_says(tmp_path: Path, nocache: bool) -> None:
    rc, text = run_vahci(tmp_path, "seq_mib=8 rand_ios=4000 qd=32",
                         "nocache = true" if nocache else "")
    assert "vahci: done" in text, text[-2000:]
    assert rc == 0, text[-2000:]
    assert f"vahci: capacity={SECTORS} ncq=32" in text
    assert f"vahci: sector 0 starts with {PATTERN}" in text
    for line in ("end read ios=8 bytes=8388608", "end write ios=8 bytes=8388608",
                 "end randread ios=4000 bytes=16384000", "end randwrite ios=4000"):
        assert line in text, line
    data = (tmp_path / "disk.img").read_bytes()
    firsts = [struct.unpack_from("<Q", data, s * 512)[0] for s in range(SECTORS)]
    assert firsts[:8 * 2048] == list(range(8 * 2048))
    rest = firsts[8 * 2048:]
    assert all(v in (s, PATTERN + s) for s, v in enumerate(rest, start=8 * 2048))
    assert sum(v == s for s, v in enumerate(rest, start=8 * 2048)) > 1000


def test_vahci_guest_sees_the_error_of_a_read_only_disk(tmp_path: Path) -> None:
    rc, text = run_vahci(tmp_path, "seq_mib=1 tests=rw", "ro = true")
    assert "end read ios=1" in text, text[-2000:]
    assert "vahci: error: NCQ command failed, error 0x0000000000000004" in text   # ABRT
    assert rc == 1
    assert struct.unpack_from("<Q", (tmp_path / "disk.img").read_bytes(), 0)[0] == PATTERN
