"""The shipped machine files: each passes `vmrun check` once its images are in the cache,
and before that says what to pull (in one line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun.testing import kernels

REPO = Path(__file__).resolve().parents[1]
CLOUD = {"ubuntu.toml": "ubuntu-24.04", "debian.toml": "debian-12"}


def _check(machine: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "XDG_DATA_HOME": str(tmp_path / "data"), "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "vmrun", "check", str(REPO / "machines" /
                          machine)], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("machine", sorted(CLOUD))
def test_a_cloud_machine_says_what_to_pull(machine: str, tmp_path: Path) -> None:
    out = _check(machine, tmp_path)
    assert out.returncode == 4
    assert out.stderr.count("\n") == 1
    assert f"is not pulled yet: run `vmrun image pull {CLOUD[machine]}` (vmrun up pulls it)" \
        in out.stderr


@pytest.mark.parametrize("machine", sorted(CLOUD))
def test_a_cloud_machine_checks_once_pulled(machine: str, tmp_path: Path) -> None:
    d = tmp_path / "cache" / "vmrun" / "images" / CLOUD[machine]
    d.mkdir(parents=True)
    (d / "vmlinuz").write_bytes(kernels.bzimage())
    (d / "initrd").write_bytes(b"070701" + bytes(100))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "3G"],
                   check=True)
    out = _check(machine, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ok (" in out.stderr
