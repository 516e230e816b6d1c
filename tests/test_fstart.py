"""``fstart`` (vmrun/testing/native/fstart.c, run in the default guest by
``bench/guest_integrity.py preempt``) does its start-up copy right on the host: each copy
variant exits 0, and a damaged copy is reported (the check is not a constant)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import guest_integrity  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.mark.parametrize("variant", ["s", "r", "g"])
def test_each_copy_lands_in_the_fresh_heap_page(tmp_path: Path, variant: str) -> None:
    prog = tmp_path / "fstart"
    prog.write_bytes(guest_integrity.build_lcheck(tmp_path, "fstart"))
    r = subprocess.run([str(prog), variant], capture_output=True, timeout=30)
    assert r.returncode == 0 and r.stdout == b"", r


def test_a_wrong_copy_is_reported(tmp_path: Path) -> None:
    src = (Path(guest_integrity.REPO) / "vmrun/testing/native/fstart.c").read_text()
    broken = src.replace("dst[i] = src[i];", "dst[i] = src[i] ^ (i == 5);")
    assert broken != src
    c = tmp_path / "fstart.c"
    c.write_text(broken)
    out = tmp_path / "broken"
    subprocess.run(["gcc", "-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin",
                    "-fno-stack-protector", "-fcf-protection=none", "-mgeneral-regs-only",
                    "-fno-pic", "-no-pie", "-o", str(out), str(c)], check=True)
    r = subprocess.run([str(out), "g"], capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stdout.startswith(b"F BAD g off=0000000000000028"), r.stdout
