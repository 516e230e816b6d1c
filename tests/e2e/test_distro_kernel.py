"""A real distribution kernel (issue 15): Debian's stock ``linux-image-amd64`` and an
initramfs-tools initrd boot under vmrun to the initramfs, which loads virtio_blk and ext4 as
modules, finds the root by its label (``root=LABEL=cloudimg-rootfs``, as Ubuntu's cloud images
boot) on a GPT disk and runs its /sbin/init. The verdict is the host's: init writes a token
onto the root file system, which the host reads back from the image after power-off.

Slow where guest kernel code is emulated (this project's kvm-pvm host: tens of minutes), so it
is ``make test-slow``, not ``make test``. What it fetches is cached in
``~/.cache/vmrun/distro-kernel`` (the .deb through apt, ~70 MB):

- the kernel: Debian's bzImage carries the vmlinux (XZ) with its PVH note, which the test
  takes out on the host as ``scripts/extract-vmlinux`` does and boots through PVH, so no
  decompressor runs in emulated guest code; the bzImage's own boot protocol path is covered
  by the default guest's tests;
- the initrd: ``mkinitramfs`` from the host's initramfs-tools, over the package's modules
  (put at /lib/modules in a private mount namespace: nothing on the host changes), with
  ``MODULES=list`` (virtio_pci, virtio_blk, ext4 and what they need) to keep it small.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import GuestRun, make_ext4, make_gpt_disk, partition_of, tiny_cmdline

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmrun" / \
    "distro-kernel"
TIMEOUT = float(os.environ.get("VMRUN_SLOW_TIMEOUT", str(3 * 3600)))
TOKEN = b"vmrun-distro-root-ok"
INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -o remount,rw /
echo "VMRUN-ROOT: init runs from the labelled root"
echo "%s $(/bin/busybox cat /proc/sys/kernel/osrelease)" > /root-ok
/bin/busybox sync
/bin/busybox poweroff -f
""" % TOKEN


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def kernel_package() -> tuple[str, Path]:
    """The package linux-image-amd64 depends on now, downloaded and unpacked once."""
    for tool in ("apt-cache", "apt-get", "dpkg-deb", "mkinitramfs", "unshare"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (make deps-slow installs what this needs)")
    deps = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    m = re.search(r"Depends: (linux-image-([0-9][^\s]*-amd64))$", deps, re.M)
    assert m, f"linux-image-amd64 depends on no kernel package:\n{deps}"
    package, version = m.group(1), m.group(2)
    root = CACHE / version
    if not (root / "boot" / f"vmlinuz-{version}").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        for old in CACHE.glob(f"{package}_*.deb"):
            old.unlink()
        _run(["apt-get", "download", "-q", package], cwd=CACHE)
        deb = next(CACHE.glob(f"{package}_*.deb"))
        tmp = root.with_suffix(".part")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return version, root


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux a bzImage carries (its payload, boot protocol 2.08+), decompressed."""
    assert bzimage[0x202:0x206] == b"HdrS", "not a bzImage"
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    if payload[:6] == b"\xfd7zXZ\x00":
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    else:
        pytest.fail(f"payload compression {payload[:4].hex()} not handled here (Debian: XZ)")
    assert elf[:4] == b"\x7fELF", "the payload is not an ELF vmlinux"
    return elf


def build_initrd(version: str, root: Path, out: Path) -> None:
    """mkinitramfs with the package's modules at /lib/modules/VERSION and its config at
    /boot, in a private mount namespace (an overlay on /usr/lib, so no host file changes)."""
    work = out.parent / "initrd-work"
    shutil.rmtree(work, ignore_errors=True)
    conf = work / "conf"
    shutil.copytree("/etc/initramfs-tools", conf)
    text = (conf / "initramfs.conf").read_text()
    (conf / "initramfs.conf").write_text(re.sub(r"^MODULES=.*$", "MODULES=list", text,
                                                flags=re.M))
    with open(conf / "modules", "a") as f:
        f.write("virtio_pci\nvirtio_blk\next4\n")
    for d in ("upper", "work"):
        (work / d).mkdir()
    script = (
        "set -e; mount --make-rprivate /; "
        f"mount -t overlay overlay -o lowerdir=/usr/lib,upperdir={work}/upper,"
        f"workdir={work}/work /usr/lib; "
        f"mkdir -p /usr/lib/modules/{version}; "
        f"mount --bind {root}/lib/modules/{version} /usr/lib/modules/{version}; "
        f"mount --bind {root}/boot /boot; "
        f"mkinitramfs -d {conf} -o {out} {version}")
    ns = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    _run([*ns, "sh", "-c", script])


def test_debian_stock_kernel_boots_to_a_root_found_by_label(tmp_path: Path) -> None:
    version, root = kernel_package()
    t0 = time.monotonic()
    (tmp_path / "vmlinux").write_bytes(
        extract_vmlinux((root / "boot" / f"vmlinuz-{version}").read_bytes()))
    build_initrd(version, root, tmp_path / "initrd.img")
    make_ext4(tmp_path / "rootfs.img", 32, {"bin/busybox": Path("/bin/busybox").read_bytes(),
                                           "sbin/init": INIT}, "cloudimg-rootfs")
    make_gpt_disk(tmp_path / "disk.raw", tmp_path / "rootfs.img")
    # The default guest's tuning, and no lockup or stall watchdogs: emulated, the kernel's
    # init work trips them, and each report they print is minutes of emulated serial output.
    tuning = tiny_cmdline().replace("console=ttyS0", "").strip() + \
        " nowatchdog nosoftlockup rcupdate.rcu_cpu_stall_suppress=1 hung_task_panic=0" \
        " sysctl.kernel.hung_task_timeout_secs=0"
    machine = tmp_path / "debian-kernel.toml"
    machine.write_text(f'''name = "debian-kernel"
cpus = 1
memory = "512M"
on_reboot = "exit"
[cpu]
profile = "compat"
[boot]
kernel = "{tmp_path / "vmlinux"}"
initrd = "{tmp_path / "initrd.img"}"
cmdline = "root=LABEL=cloudimg-rootfs ro console=ttyS0 panic=-1 {tuning}"
[serial.com1]
backend = "stdio"
[devices.disk]
model = "virtio-blk"
path = "{tmp_path / "disk.raw"}"
''')
    prepared = time.monotonic() - t0
    run = GuestRun(machine)
    try:
        run.wait_for(r"Linux version " + re.escape(version), timeout=600)
        run.wait_for(r"Run /init as init process", timeout=TIMEOUT)
        run.wait_for(r"EXT4-fs \(vda1\): mounted filesystem", timeout=TIMEOUT)
        run.wait_for(r"VMRUN-ROOT: init runs from the labelled root", timeout=TIMEOUT)
        assert run.wait_exit(timeout=600) == 0, run.tail()
    finally:
        run.close()
    booted = time.monotonic() - t0 - prepared
    fs = partition_of(tmp_path / "disk.raw", (tmp_path / "rootfs.img").stat().st_size,
                      tmp_path / "after.img")
    got = _run(["debugfs", "-R", "cat /root-ok", str(fs)]).stdout.encode()
    assert got == TOKEN + b" " + version.encode() + b"\n", got
    print(f"prepared in {prepared:.0f} s, booted to its root's init and off in {booted:.0f} s")
