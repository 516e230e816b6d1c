"""How ``vmrun.testing.native`` builds its guests: the shared headers (``runtime.h``,
``virtio.h``) are in every guest's cache key, so changing one rebuilds them all, and every
guest builds without a warning."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmrun.testing import native

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the guests' sources that build() reads, and a cache of its own."""
    src = tmp_path / "src"
    shutil.copytree(native.SOURCE_DIR, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(native, "SOURCE_DIR", src)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return src


def test_every_guest_includes_the_runtime() -> None:
    for name in native.GUESTS:
        text = (native.SOURCE_DIR / f"{name}.c").read_text()
        assert f'#define GUEST_NAME "{name}"' in text, name
        assert '#include "runtime.h"' in text, name


def test_a_header_is_in_every_guests_cache_key(sources: Path) -> None:
    before = {name: native.cache_key(name) for name in native.GUESTS}
    runtime = sources / "runtime.h"
    runtime.write_text(runtime.read_text() + "/* changed */\n")
    after = {name: native.cache_key(name) for name in native.GUESTS}
    assert all(after[name] != before[name] for name in native.GUESTS), (before, after)
    (sources / "new.h").write_text("/* a header no guest includes yet */\n")
    assert all(native.cache_key(name) != after[name] for name in native.GUESTS)
    # a guest's own source is in its key only
    keys = {name: native.cache_key(name) for name in native.GUESTS}
    (sources / "vblk.c").write_text((sources / "vblk.c").read_text() + "\n")
    assert native.cache_key("vblk") != keys["vblk"]
    assert all(native.cache_key(name) == keys[name] for name in native.GUESTS if name != "vblk")


def test_a_header_change_rebuilds_the_guest(sources: Path) -> None:
    first = native.build("vfb")
    assert first.exists()
    mtime = first.stat().st_mtime_ns
    assert native.build("vfb") == first and first.stat().st_mtime_ns == mtime   # cached
    runtime = sources / "runtime.h"
    runtime.write_text(runtime.read_text() + "/* changed */\n")
    second = native.build("vfb")
    assert second != first and second.exists()


def test_every_guest_builds_without_warnings(tmp_path: Path) -> None:
    for name in native.GUESTS:
        res = subprocess.run(["gcc", *native.CFLAGS, "-T", str(native.SOURCE_DIR / "link.ld"),
                              "-o", str(tmp_path / f"{name}.elf"),
                              str(native.SOURCE_DIR / "entry.S"),
                              str(native.SOURCE_DIR / f"{name}.c")],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "warning" not in res.stderr, res.stderr
