"""Clients nobody here wrote: vncdotool (PyPI) captures the frame and must match the guest's
framebuffer pixel for pixel, with and without a password; TigerVNC's viewer under Xvfb
connects, negotiates, stays connected for several updates, and its window shows the frame."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plugins.fbuf_vnc.tests.fbufrig import Rig

VNCDO = Path(sys.executable).parent / "vncdo"


def _pattern(rig: Rig) -> None:
    w, h, _ = rig.mode
    rig.fill(0, 0, w, h, 0x00202020)
    rig.fill(40, 40, 200, 120, 0x00FF0000)
    rig.fill(300, 200, 64, 64, 0x0000FF00)
    rig.fill(500, 100, 100, 300, 0x000000FF)
    for y in range(420, 460):
        rig.fill(0, y, w, 1, (y * 0x010305) & 0xFFFFFF)


def _rgb(frame: bytes) -> bytes:
    out = bytearray(len(frame) // 4 * 3)
    out[0::3], out[1::3], out[2::3] = frame[2::4], frame[1::4], frame[0::4]
    return bytes(out)


def _vncdo(rig: Rig, *args: str, password: str | None = None, timeout: float = 60) -> None:
    if not VNCDO.exists():
        pytest.fail("vncdotool is not installed (pip install -e '.[test]')")
    host, port = rig.address
    cmd = [str(VNCDO), "-s", f"{host}::{port}"]
    if password:
        cmd += ["-p", password]
    subprocess.run([*cmd, *args], check=True, timeout=timeout, capture_output=True)


@pytest.mark.parametrize("password", [None, "pa55word"])
def test_vncdotool_capture_is_pixel_exact(tmp_path: Path, password: str | None) -> None:
    from PIL import Image

    rig = Rig(password=password)
    try:
        rig.set_mode(800, 600)
        _pattern(rig)
        out = tmp_path / "capture.png"
        _vncdo(rig, "capture", str(out), password=password)
        img = Image.open(out).convert("RGB")
        assert img.size == (800, 600)
        assert img.tobytes() == _rgb(rig.frame())
    finally:
        rig.close()


def test_vncdotool_types_and_clicks() -> None:
    from plugins.fbuf_vnc.tests.fbufrig import Sink

    rig = Rig()
    try:
        rig.set_mode(640, 480)
        sink = Sink()
        rig.vm.host.input.attach(sink)
        _vncdo(rig, "type", "Hi!", "move", "320", "240", "click", "1")
        downs = [c for c, d in sink.keys if d]
        assert downs == [42, 35, 23, 42, 2]                 # shift h, i, shift 1
        assert (320 * 0x7FFF // 639, 240 * 0x7FFF // 479, 0, 1) in sink.abs, sink.abs
    finally:
        rig.close()


def test_vncdotool_wrong_password_is_refused(tmp_path: Path) -> None:
    rig = Rig(password="right")
    try:
        rig.set_mode(640, 480)
        with pytest.raises((subprocess.CalledProcessError, subprocess.TimeoutExpired)):
            _vncdo(rig, "capture", str(tmp_path / "x.png"), password="wrong", timeout=20)
        assert not (tmp_path / "x.png").exists()
    finally:
        rig.close()


def _free_display() -> int:
    for n in range(90, 140):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display number")


def test_tigervnc_viewer_under_xvfb(tmp_path: Path) -> None:
    for tool in ("Xvfb", "vncviewer"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian packages xvfb and "
                        "tigervnc-viewer (make deps does)")
    from PIL import ImageGrab

    rig = Rig()
    n = _free_display()
    xvfb = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "1280x1024x24", "-nolisten",
                             "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    viewer = None
    try:
        rig.set_mode(800, 600)
        _pattern(rig)
        for _ in range(100):
            if Path(f"/tmp/.X11-unix/X{n}").exists():
                break
            time.sleep(0.1)
        host, port = rig.address
        env = {**os.environ, "DISPLAY": f":{n}", "HOME": str(tmp_path)}
        viewer = subprocess.Popen(["vncviewer", "-SecurityTypes", "None", "-Shared",
                                   "-FullScreen=0", f"{host}::{port}"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        client = None
        while time.monotonic() < deadline:
            live = [c for c in rig.server.clients if c.state == "normal"]
            if live and rig.server.updates_sent >= 1:
                client = live[0]
                break
            time.sleep(0.2)
        assert client is not None, "TigerVNC did not connect"
        # It stays connected through several updates.
        sent = rig.server.updates_sent
        for i in range(4):
            rig.fill(40 + 30 * i, 300, 20, 20, 0x00FFFF00)
            time.sleep(0.5)
        assert viewer.poll() is None and client in rig.server.clients
        assert rig.server.updates_sent > sent
        # Its window shows the frame: the red block is on the X screen.
        time.sleep(1)
        shot = ImageGrab.grab(xdisplay=f":{n}").convert("RGB")
        colours = dict((c, k) for k, c in shot.getcolors(1 << 20) or [])
        assert colours.get((255, 0, 0), 0) >= 200 * 120 * 0.9, "the red block is not shown"
        assert colours.get((0, 0, 255), 0) >= 100 * 300 * 0.9
    finally:
        if viewer is not None:
            viewer.terminate()
            try:
                viewer.wait(5)
            except subprocess.TimeoutExpired:
                viewer.kill()
        xvfb.terminate()
        xvfb.wait(5)
        rig.close()
