"""End-to-end harness: run ``vmrun up`` with its console on a pseudo-terminal, as a user would.

Each boot of the real default guest costs minutes where KVM emulates guest kernel code, so the
tests share a few boots and check many things in each one.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from vmrun.image import resolve_image_path

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = float(os.environ.get("VMRUN_E2E_BOOT_TIMEOUT", "900"))
# Boots of the default guest are CPU-bound for minutes where KVM emulates guest kernel code:
# two test sessions booting at once (several checkouts on one host) would each time out. A
# host-wide lock, held while any GuestRun of this process is alive, runs them one at a time.
LOCK_PATH = os.environ.get("VMRUN_E2E_LOCK", "/tmp/vmrun-e2e.lock")
_lock_fd: int | None = None
_lock_users = 0


def _acquire_boot_lock() -> None:
    global _lock_fd, _lock_users
    if _lock_users == 0:
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _lock_fd = fd
    _lock_users += 1


def _release_boot_lock() -> None:
    global _lock_fd, _lock_users
    _lock_users -= 1
    if _lock_users == 0 and _lock_fd is not None:
        os.close(_lock_fd)
        _lock_fd = None


class GuestRun:
    """A running ``vmrun up``: console on a pty, vmrun's own messages on a pipe."""

    def __init__(self, machine: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.machine = machine
        _acquire_boot_lock()
        self._locked = True
        master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.master = master
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmrun", "up", "-v", str(machine), *extra_args],
            stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=REPO,
            start_new_session=True, env={**os.environ, **(env or {})})
        os.close(slave)
        self.console = b""
        self.stderr = b""
        self.returncode: int | None = None

    def _pump(self, timeout: float) -> None:
        fds = [self.master]
        if self.proc.stderr is not None:
            fds.append(self.proc.stderr.fileno())
        r, _, _ = select.select(fds, [], [], timeout)
        for fd in r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if fd == self.master:
                self.console += data
            else:
                self.stderr += data

    def wait_for(self, pattern: str | bytes, timeout: float = BOOT_TIMEOUT) -> re.Match:
        pat = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = pat.search(self.console)
            if m:
                return m
            if self.proc.poll() is not None:
                self._pump(0.2)
                m = pat.search(self.console)
                if m:
                    return m
                raise AssertionError(f"vmrun exited ({self.proc.returncode}) before "
                                     f"{pattern!r}; console tail:\n{self.tail()}")
            self._pump(0.5)
        raise AssertionError(f"no {pattern!r} within {timeout}s; console tail:\n{self.tail()}")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self._pump(0.5)
        if self.proc.poll() is None:
            self.kill()
            raise AssertionError(f"vmrun did not exit within {timeout}s; console tail:\n"
                                 f"{self.tail()}")
        for _ in range(20):
            before = len(self.console) + len(self.stderr)
            self._pump(0.05)
            if len(self.console) + len(self.stderr) == before:
                break
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        try:
            os.close(self.master)
        except OSError:
            pass
        if self._locked:
            self._locked = False
            _release_boot_lock()

    def tail(self, n: int = 2500) -> str:
        return self.console[-n:].decode(errors="replace")

    @property
    def text(self) -> str:
        return self.console.decode(errors="replace")

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")


def require_guest_image() -> tuple[Path, Path]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm on this host")
    kernel = resolve_image_path("image:tiny/vmlinux")
    initrd = resolve_image_path("image:tiny/initramfs.cpio.gz")
    if not kernel.exists() or not initrd.exists():
        pytest.fail("the default guest is not built: run `vmrun image build tiny` "
                    "(make test does it first)")
    return kernel, initrd


def tiny_cmdline() -> str:
    text = (REPO / "machines" / "tiny.toml").read_text()
    m = re.search(r'^cmdline\s*=\s*"([^"]*)"', text, re.M)
    assert m, "machines/tiny.toml has no cmdline"
    return m.group(1)


def make_ext4(path: Path, size_mib: int, files: dict[str, bytes], label: str) -> None:
    """An ext4 image made on the host with mkfs.ext4 -d (no mount, no root needed)."""
    root = path.with_suffix(".d")
    if root.exists():
        shutil.rmtree(root)
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o755)
    for d in ("dev", "proc", "sys", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(root), str(path),
                    f"{size_mib}M"], check=True)


def ext4_mount_count(image: Path) -> int:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, capture_output=True,
                         text=True).stdout
    return int(re.search(r"^Mount count:\s+(\d+)", out, re.M).group(1))


PART_START = 1 << 20       # the first partition of make_gpt_disk starts at 1 MiB


def make_gpt_disk(path: Path, fs_image: Path, name: str = "root") -> None:
    """A GPT disk as cloud images are laid out: one Linux partition at 1 MiB holding
    ``fs_image`` (made by sfdisk, so the tables are what a partitioner writes)."""
    size = PART_START + fs_image.stat().st_size + (1 << 20)
    with open(path, "wb") as f:
        f.truncate(size)
    script = f"label: gpt\nstart=2048, size={fs_image.stat().st_size // 512}, " \
             f"type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name={name}\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=script.encode(), check=True)
    with open(path, "r+b") as f, open(fs_image, "rb") as src:
        f.seek(PART_START)
        shutil.copyfileobj(src, f)


def partition_of(disk: Path, fs_size: int, out: Path) -> Path:
    """The first partition of a make_gpt_disk image, copied out (for e2fsck, debugfs)."""
    with open(disk, "rb") as f, open(out, "wb") as dst:
        f.seek(PART_START)
        dst.write(f.read(fs_size))
    return out
