"""Running VMs on this host: one state directory per VM name, claimed with a lock.

``vmrun up`` claims ``ROOT/NAME/`` for the VM's whole life, where ROOT is
``$VMRUN_STATE_DIR``, else ``/run/vmrun`` as root, else ``$XDG_RUNTIME_DIR/vmrun``, else
``/tmp/vmrun-UID``. The directory (mode 0700) holds:

- ``lock``: held with ``flock`` by the vmrun process. The kernel lets go of it when that
  process dies, however it dies, so a VM whose vmrun was killed never blocks the next ``up``
  of its name: whoever takes the lock next removes what the dead one left (sockets, pidfile);
- ``pid``, ``state.json`` (name, pid, start time, vCPUs, memory, machine file, the control
  socket's and the console's paths), ``qmp.sock`` (unless the machine file's
  ``control_socket`` puts it elsewhere), ``console.sock`` (a detached VM's serial console);
- ``log``: a detached VM's stdout and stderr. It stays after the VM ends (``vmrun logs``).

Two VMs cannot share a name: the second ``up`` finds the lock taken (one line, exit 4).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmrun.errors import VmrunError

STATE_FILES = ("pid", "state.json", "qmp.sock", "console.sock")
CLAIM_RETRY_S = 0.5        # `vmrun ps` probes locks briefly: a claim retries that long


def state_root() -> Path:
    env = os.environ.get("VMRUN_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/vmrun")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "vmrun"
    return Path(f"/tmp/vmrun-{os.getuid()}")


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        raise VmrunError(f"{path}: state directory is not a directory")
    if st.st_uid != os.geteuid():
        raise VmrunError(f"{path}: state directory belongs to another user")


@dataclass
class Instance:
    """A claimed state directory (this process holds its lock)."""

    name: str
    dir: Path
    lock_fd: int

    @property
    def qmp_path(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console_path(self) -> Path:
        return self.dir / "console.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "log"

    def write_state(self, **fields: Any) -> None:
        """pid and state.json, written whole (a reader never sees half a file)."""
        _atomic_write(self.dir / "pid", f"{os.getpid()}\n")
        data = {"name": self.name, "pid": os.getpid(), "started": time.time(), **fields}
        _atomic_write(self.dir / "state.json", json.dumps(data, default=str) + "\n")

    def release(self) -> None:
        """The VM has ended: its sockets and state go, the log stays."""
        _remove_state(self.dir)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _remove_state(d: Path) -> None:
    for name in STATE_FILES:
        try:
            (d / name).unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass


def _open_lock(d: Path) -> int:
    return os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def claim(name: str) -> Instance:
    """Take ``name``'s state directory for this process, or VmrunError when a VM of that
    name runs. What a dead VM left there is removed."""
    root = state_root()
    _mkdir(root)
    d = root / name
    _mkdir(d)
    fd = _open_lock(d)
    deadline = time.monotonic() + CLAIM_RETRY_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                os.close(fd)
                pid = _read_pid(d)
                raise VmrunError(f"a VM named {name} is already running"
                                 + (f" (pid {pid})" if pid else "")
                                 + f"; `vmrun stop {name}` ends it") from None
            time.sleep(0.05)
    _remove_state(d)
    return Instance(name, d, fd)


def _read_pid(d: Path) -> int | None:
    try:
        return int((d / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass
class RunningVm:
    """What ``vmrun ps`` knows of a VM from its state directory."""

    name: str
    dir: Path
    pid: int
    state: dict[str, Any]

    @property
    def qmp_path(self) -> Path:
        return Path(self.state.get("qmp") or self.dir / "qmp.sock")

    @property
    def console(self) -> str:
        return str(self.state.get("console") or "")

    @property
    def log_path(self) -> Path:
        return self.dir / "log"


def is_running(d: Path) -> bool:
    """Whether a live vmrun holds ``d``'s lock (a shared lock probe; never blocks)."""
    try:
        fd = os.open(d / "lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def running() -> list[RunningVm]:
    """Every VM of this user whose vmrun is alive, by name."""
    root = state_root()
    out = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    for d in entries:
        if not d.is_dir() or d.is_symlink() or not is_running(d):
            continue
        try:
            state = json.loads((d / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        out.append(RunningVm(d.name, d, int(state.get("pid") or _read_pid(d) or 0), state))
    return out


def find(name: str) -> RunningVm:
    """The running VM ``name``, or VmrunError (one line)."""
    from vmrun.config import NAME_RE

    if not NAME_RE.fullmatch(name):
        raise VmrunError(f"{name!r} is not a VM name (1-64 characters of A-Z a-z 0-9 . _ -)")
    for vm in running():
        if vm.name == name:
            return vm
    raise VmrunError(f"no VM named {name} is running (see `vmrun ps`)")


def log_path(name: str) -> Path:
    """A VM's log file, running or not (VmrunError when there is none)."""
    from vmrun.config import NAME_RE

    if not NAME_RE.fullmatch(name):
        raise VmrunError(f"{name!r} is not a VM name (1-64 characters of A-Z a-z 0-9 . _ -)")
    p = state_root() / name / "log"
    if not p.is_file():
        raise VmrunError(f"no log for a VM named {name} (only `vmrun up -d` writes one)")
    return p
