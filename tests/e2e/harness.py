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
from collections.abc import Callable
from pathlib import Path

import pytest

from vmrun.image import resolve_image_path

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = float(os.environ.get("VMRUN_E2E_BOOT_TIMEOUT", "900"))
#: Typed into the shell of a guest before it is snapshotted: from then on it keeps time by
#: kvm-clock, not the TSC. This host's KVM ignores a write of the guest's TSC, so a guest
#: restored later sees its TSC (and, with tsc as clocksource, its clock) jump by the time
#: since the snapshot, and a periodic-tick kernel then replays every missed tick in emulated
#: kernel code (minutes); KVM_SET_CLOCK restores kvm-clock exactly. Switched at the shell, not
#: with ``clocksource=kvm-clock`` on the command line: a boot that stayed on kvm-clock stopped
#: for 12 minutes right after the switch on a loaded host (issue 8), while boots move on to the
#: TSC 30 s later. It prints ``CS=kvm-clock``.
RESTORABLE = ("echo kvm-clock >/sys/devices/system/clocksource/clocksource0/current_clocksource;"
              " sed 's/^/CS=/' /sys/devices/system/clocksource/clocksource0/current_clocksource")
RESTORABLE_DONE = r"CS=kvm-clock"
#: How a test powers the guest off from its shell. ``poweroff`` only signals init, which then
#: shuts down by itself; the short-lived ``poweroff`` process is what issue 8's crashes (a
#: fresh process that dies at its first TLS access) can hit, so a crashed one is run again.
POWEROFF = b"until poweroff; do sleep 1; done\r"
# Boots of the default guest are CPU-bound for minutes where KVM emulates guest kernel code
# (one vCPU: one host CPU): more of them at once than the host has CPUs would each time out.
# Host-wide lock slots (``VMRUN_E2E_LOCK.0``, ``.1``, ...; ``VMRUN_E2E_SLOTS`` of them, by
# default one per host CPU) are held while any GuestRun of this process is alive, so the
# test sessions on one host (make test runs two beside each other, other checkouts may run
# theirs) never run more guests than that.
LOCK_PATH = os.environ.get("VMRUN_E2E_LOCK", "/tmp/vmrun-e2e.lock")
SLOTS = int(os.environ.get("VMRUN_E2E_SLOTS", str(os.cpu_count() or 1)))
_lock_fd: int | None = None
_lock_users = 0


def _acquire_boot_lock() -> None:
    global _lock_fd, _lock_users
    if _lock_users == 0:
        while _lock_fd is None:
            for i in range(max(1, SLOTS)):
                fd = os.open(f"{LOCK_PATH}.{i}", os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                _lock_fd = fd
                break
            else:
                time.sleep(0.5)
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
        #: (seconds since start, what was awaited or sent): where a slow run spent its time,
        #: written beside the machine file as ``*.timeline.txt``.
        self.timeline: list[tuple[float, str]] = []

    def mark(self, what: str) -> None:
        self.timeline.append((time.monotonic() - self.t0, what))

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

    def wait_for(self, pattern: str | bytes, timeout: float = BOOT_TIMEOUT,
                 stream: str = "console") -> re.Match:
        """The first match of ``pattern`` in the guest's console (``stream="console"``) or in
        what vmrun itself writes (``"stderr"``), waiting up to ``timeout`` seconds."""
        pat = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if m := pat.search(getattr(self, stream)):
                self.mark(f"seen {pattern!r}")
                return m
            if self.proc.poll() is not None:
                self._pump(0.2)
                if m := pat.search(getattr(self, stream)):
                    return m
                raise AssertionError(f"vmrun exited ({self.proc.returncode}) before "
                                     f"{pattern!r}; console tail:\n{self.tail()}\n"
                                     f"vmrun: {self.log[-2000:]}")
            self._pump(0.5)
        raise AssertionError(f"no {pattern!r} within {timeout}s; console tail:\n{self.tail()}"
                             f"\nvmrun: {self.log[-2000:]}")

    def wait_for_log(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match:
        """:meth:`wait_for` on what vmrun itself writes (stderr)."""
        return self.wait_for(pattern, timeout, stream="stderr")

    def send(self, data: bytes) -> None:
        self.mark(f"sent {data[:60]!r}")
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
        # What the guest and vmrun said, beside the machine file, for a failure's post-mortem.
        try:
            self.machine.with_suffix(".console.log").write_bytes(self.console)
            self.machine.with_suffix(".vmrun.log").write_bytes(self.stderr)
            self.machine.with_suffix(".timeline.txt").write_text(
                "".join(f"{t:8.1f}s  {what}\n" for t, what in self.timeline))
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
    initrd = resolve_image_path("image:tiny/initramfs.cpio")
    if not kernel.exists() or not initrd.exists():
        pytest.fail("the default guest is not built: run `vmrun image build tiny` "
                    "(make test does it first)")
    return kernel, initrd


def tiny_cmdline() -> str:
    text = (REPO / "machines" / "tiny.toml").read_text()
    m = re.search(r'^cmdline\s*=\s*"([^"]*)"', text, re.M)
    assert m, "machines/tiny.toml has no cmdline"
    return m.group(1)


def make_ext4(path: Path, size_mib: int, files: dict[str, bytes], label: str,
              block_size: int | None = None) -> None:
    """An ext4 image made on the host with mkfs.ext4 -d (no mount, no root needed). A disk
    with 4096-byte sectors needs ``block_size=4096`` (mkfs picks 1 KiB blocks for small
    file systems, and Linux mounts no block smaller than the sector)."""
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
    bs = ["-b", str(block_size)] if block_size else []
    subprocess.run(["mkfs.ext4", "-q", "-F", *bs, "-L", label, "-d", str(root), str(path),
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


class ShellSnapshot:
    """A guest booted once to its shell and saved there (``vmrun snapshot``), so that each
    test restores its own copy (``vmrun up --restore``) in seconds instead of booting for
    minutes, and no test sees what another one did in the guest or on its disks.

    :meth:`take` is called on the boot at its shell: it saves the snapshot and copies the
    disk files (``files``, relative to the boot's directory ``dir``) as they were saved; the
    boot itself may go on. :meth:`restore` gives a test a fresh directory with those copies
    and the machine file pointing at them, and starts the saved guest there: a
    :class:`GuestRun` whose console continues the saved shell."""

    def __init__(self, machine: Path, name: str, files: list[str],
                 env_for: Callable[[Path], dict[str, str]] | None = None) -> None:
        self.machine = machine
        self.dir = machine.parent
        self.name = name
        self.files = files
        self.env_for = env_for or (lambda d: {})
        self.snapshot = self.dir / "saved" / "shell.snap"
        self.saved: subprocess.CompletedProcess | None = None
        self.restores = 0

    def take(self) -> None:
        self.snapshot.parent.mkdir(exist_ok=True)
        self.saved = subprocess.run([sys.executable, "-m", "vmrun", "snapshot", self.name,
                                     str(self.snapshot)], capture_output=True, text=True,
                                    timeout=300)
        if self.saved.returncode != 0:
            raise AssertionError(f"vmrun snapshot failed: {self.saved.stderr}")
        for name in self.files:     # the disks as saved (the guest has them all unmounted)
            _copy_sparse(self.dir / name, self.snapshot.parent / name)

    def restore(self, into: Path) -> GuestRun:
        """Start the saved guest with its own copies of the disks, in ``into``."""
        if self.saved is None or self.saved.returncode != 0:
            pytest.fail("the shell snapshot was not taken (see the boot's checks)")
        into.mkdir(parents=True, exist_ok=True)
        for name in self.files:
            _copy_sparse(self.snapshot.parent / name, into / name)
        machine = into / self.machine.name
        machine.write_text(self.machine.read_text().replace(str(self.dir), str(into)))
        self.restores += 1
        return GuestRun(machine, extra_args=("--restore", str(self.snapshot)),
                        env=self.env_for(into))


def _copy_sparse(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
                   check=True)
