"""A root file system on a qcow2 overlay of a qcow2 base, booted through virtio-blk (issue 12).

One boot, in three parts that can be lifted into a shared boot: :func:`qcow2_setup` makes the
images host-side (an ext4 made with ``mkfs.ext4 -d``, converted to a qcow2 base by
``qemu-img``, and an overlay of it made by ``vmrun image create --backing``) and returns the
``[devices.*]`` fragment; :func:`drive_root_boot` waits for the root mount and ends the guest
with SysRq (sync, remount read-only, power off) — /sbin/init never makes a system call, so
guest user space is not needed; the ``test_*`` checks then read the console and the files:
the guest's writes (the ext4 mount count) landed in the overlay, the base is byte for byte
what it was, ``qemu-img check`` finds the overlay clean and ``e2fsck -fn`` a raw copy of it.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import (
    GuestRun,
    ext4_mount_count,
    make_ext4,
    require_guest_image,
    tiny_cmdline,
)
from tests.e2e.test_guest import machine_file, sysrq
from vmrun.testing.kernels import spin_init_elf

pytestmark = pytest.mark.e2e

VMRUN = (sys.executable, "-m", "vmrun")


@dataclass
class Qcow2Root:
    dir: Path
    base: Path
    overlay: Path
    base_digest: str
    mount_count: int


def qcow2_setup(d: Path) -> tuple[str, Qcow2Root]:
    """Host side: the base and overlay images; returns the device fragment (root = vda)."""
    raw = d / "root.raw"
    make_ext4(raw, 64, {"sbin/init": spin_init_elf(), "etc/hostname": b"vmrun\n"}, "root")
    before = ext4_mount_count(raw)
    base = d / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)],
                   check=True)
    raw.unlink()
    overlay = d / "overlay.qcow2"
    subprocess.run([*VMRUN, "image", "create", str(overlay), "--format", "qcow2",
                    "--backing", "base.qcow2"], check=True)
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    devices = f'''
[devices.root]
model = "virtio-blk"
path = "{overlay}"
'''
    return devices, Qcow2Root(d, base, overlay, digest, before)


def drive_root_boot(run: GuestRun) -> int:
    """Wait for the root mount, then SysRq s, u, o; returns vmrun's exit code."""
    run.wait_for(r"VFS: Mounted root \(ext4 filesystem\)[^\n]*")
    run.wait_for(r"Run /sbin/init as init process", 120)
    time.sleep(3)
    sysrq(run, "s")
    run.wait_for(r"Emergency Sync complete", 120)
    sysrq(run, "u")
    run.wait_for(r"Emergency Remount complete", 120)
    sysrq(run, "o")
    return run.wait_exit(300)


@dataclass
class Boot:
    run: GuestRun
    returncode: int
    root: Qcow2Root


@pytest.fixture(scope="module")
def qcow2_root(tmp_path_factory) -> Boot:
    kernel, _ = require_guest_image()
    d = tmp_path_factory.mktemp("qcow2root")
    devices, root = qcow2_setup(d)
    cmdline = tiny_cmdline() + " root=/dev/vda rw rootwait panic=-1"
    m = machine_file(d / "root.toml", kernel=kernel, initrd=None, cmdline=cmdline,
                     devices=devices, cpus=1)
    run = GuestRun(m)
    try:
        code = drive_root_boot(run)
        return Boot(run, code, root)
    finally:
        run.close()


def test_qcow2_overlay_root_mounts_and_powers_off(qcow2_root: Boot) -> None:
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) on device 254:0",
                     qcow2_root.run.text)
    assert qcow2_root.returncode == 1, qcow2_root.run.log[-2000:]      # SysRq o: power off


def test_qcow2_base_is_untouched(qcow2_root: Boot) -> None:
    r = qcow2_root.root
    assert hashlib.sha256(r.base.read_bytes()).hexdigest() == r.base_digest


def test_qcow2_overlay_passes_qemu_img_check(qcow2_root: Boot) -> None:
    r = qcow2_root.root
    out = subprocess.run(["qemu-img", "check", str(r.overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    info = subprocess.run([*VMRUN, "image", "info", str(r.overlay)], capture_output=True,
                          text=True, check=True).stdout
    m = re.search(r"allocated: .*\((\d+) bytes", info)
    assert m and int(m.group(1)) > 0, info                   # the guest's writes are here


def test_qcow2_guest_writes_landed_in_the_overlay(qcow2_root: Boot, tmp_path: Path) -> None:
    r = qcow2_root.root
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(r.overlay), str(flat)], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(flat)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert ext4_mount_count(flat) == r.mount_count + 1
    base_flat = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(r.base), str(base_flat)],
                   check=True)
    assert ext4_mount_count(base_flat) == r.mount_count
