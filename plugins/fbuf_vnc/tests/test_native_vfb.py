"""The device in a real KVM guest: the native ``vfb`` guest (guest user mode) sets a mode and
draws into BAR 0 — a KVM memory slot, so no exits — and a VNC capture shows its frame."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmrun_fbuf_vnc.client import capture

pytestmark = pytest.mark.kvm


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_native_guest_draws_through_the_memory_slot(tmp_path: Path) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm on this host")
    from vmrun.testing import native

    elf = native.build("vfb")
    port = _free_port()
    machine = tmp_path / "vfb.toml"
    machine.write_text(f'''name = "vfb"
cpus = 1
memory = "32M"
on_reboot = "exit"
[boot]
kernel = "{elf}"
cmdline = "w=800 h=600 work=full"
[serial.debugcon]
backend = "stdio"
[devices.fb]
model = "fbuf"
listen = "127.0.0.1:{port}"
w = 800
h = 600
''')
    proc = subprocess.Popen([sys.executable, "-m", "vmrun", "up", "-v", str(machine)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = b""
        end = time.monotonic() + 60
        while b"vfb: ready" not in out and time.monotonic() < end and proc.poll() is None:
            out += proc.stdout.read1(4096)
        assert b"vfb: ready" in out, out[-2000:]
        time.sleep(0.5)
        w, h, rgb = capture(("127.0.0.1", port))
        assert (w, h) == (800, 600)
        colours = {rgb[i:i + 3] for i in range(0, len(rgb), 3 * 97)}
        # The guest's four band colours (XRGB 0x203040, 0xC08020, 0x10A0F0, 0xFFFFFF).
        assert colours <= {b"\x20\x30\x40", b"\xc0\x80\x20", b"\x10\xa0\xf0", b"\xff\xff\xff"}
        assert len(colours) >= 3
    finally:
        proc.kill()
        proc.wait()


def test_vmrun_screenshot_of_a_background_vm(tmp_path: Path) -> None:
    """`vmrun up -d` a vfb guest, then `vmrun screenshot NAME out.png` (QMP screendump)
    shows its frame: the same band colours the VNC capture sees."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm on this host")
    from PIL import Image

    from vmrun.testing import native

    elf = native.build("vfb")
    machine = tmp_path / "shot.toml"
    machine.write_text(f'''name = "vfb-shot"
cpus = 1
memory = "32M"
[boot]
kernel = "{elf}"
cmdline = "w=800 h=600 work=full"
[devices.fb]
model = "fbuf"
listen = "127.0.0.1:{_free_port()}"
w = 800
h = 600
''')
    env = {**os.environ, "VMRUN_STATE_DIR": str(tmp_path / "run")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "vmrun", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    up = run("up", "-d", str(machine))
    assert up.returncode == 0, up.stderr
    try:
        out = tmp_path / "shot.png"
        for _ in range(40):                       # until the guest has drawn its bands
            shot = run("screenshot", "vfb-shot", str(out))
            assert shot.returncode == 0, shot.stderr
            img = Image.open(out).convert("RGB")
            colours = {c for _, c in img.getcolors(1 << 20) or []}
            if len(colours) >= 3:
                break
            time.sleep(0.5)
        assert img.size == (800, 600)
        assert colours <= {(0x20, 0x30, 0x40), (0xC0, 0x80, 0x20), (0x10, 0xA0, 0xF0),
                           (0xFF, 0xFF, 0xFF)} and len(colours) >= 3, colours
        bad = run("screenshot", "vfb-shot", "/nonexistent-dir/x.png")
        assert bad.returncode == 4 and bad.stderr.count("\n") == 1, bad.stderr
    finally:
        run("kill", "vfb-shot")
