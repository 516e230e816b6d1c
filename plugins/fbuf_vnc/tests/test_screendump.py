"""QMP ``screendump`` (and ``vmrun screenshot``'s PNG): the display's visible frame, pixel
for pixel, in PPM and PNG; bad arguments are QMP errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmrun_fbuf_vnc.plugin import _screendump

from plugins.fbuf_vnc.tests.fbufrig import Rig
from vmrun.qmp import QmpError


class Ctx:
    def __init__(self, dev) -> None:
        self.machine = type("M", (), {"devices": [dev], "placed": []})()

    def device(self, dev_id: str):
        raise QmpError(f"Device '{dev_id}' not found")


@pytest.fixture
def rig():
    r = Rig(w=640, h=480)
    r.set_mode(640, 480)
    r.fill(0, 0, 640, 480, 0x000000)
    r.fill(10, 20, 30, 5, 0x00FF8040)          # XRGB: R=ff G=80 B=40
    yield r
    r.server.close()


def test_png_shows_the_frame(rig: Rig, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "shot.png"
    _screendump(Ctx(rig.dev), str(out), format="png")
    img = Image.open(out).convert("RGB")
    assert img.size == (640, 480)
    assert img.getpixel((10, 20)) == (0xFF, 0x80, 0x40)
    assert img.getpixel((39, 24)) == (0xFF, 0x80, 0x40)
    assert img.getpixel((40, 24)) == (0, 0, 0) and img.getpixel((10, 25)) == (0, 0, 0)


def test_ppm_is_qemus_default(rig: Rig, tmp_path: Path) -> None:
    out = tmp_path / "shot.ppm"
    _screendump(Ctx(rig.dev), str(out))
    data = out.read_bytes()
    head = b"P6\n640 480\n255\n"
    assert data.startswith(head) and len(data) == len(head) + 640 * 480 * 3
    px = head.__len__() + (20 * 640 + 10) * 3
    assert data[px:px + 3] == b"\xff\x80\x40"


@pytest.mark.parametrize("kwargs, message", [
    ({"filename": "relative.png"}, "give an absolute path"),
    ({"filename": "/nonexistent-dir/x.png"}, "give an absolute path"),
    ({"filename": "/tmp/x.png", "format": "bmp"}, "does not accept value 'bmp'"),
    ({"filename": "/tmp/x.png", "head": 1}, "one head"),
    ({"filename": "/tmp/x.png", "device": "nope"}, "Device 'nope' not found"),
])
def test_bad_arguments_are_qmp_errors(rig: Rig, kwargs: dict, message: str) -> None:
    with pytest.raises(QmpError, match=message):
        _screendump(Ctx(rig.dev), **kwargs)
