"""``vmrun ssh NAME``: log in to a running VM through its forwarded ssh port.

The target comes from what the VM was started with: the machine file its state directory
records (``vmrun.instances``), the NIC ``forward`` that maps a loopback port to the guest's
port 22 (the port vmrun picked, where the file says ``auto``, is in the VM's state), and the
user ``[cloud-init]`` created. The key is vmrun's own (:func:`vmrun.cloudinit.vmrun_key`), which
every cloud-init seed authorizes. ``vmrun ssh`` waits, with a spinner, until the guest's sshd
answers with its banner, then runs the host's ``ssh`` in its place.
"""

from __future__ import annotations

import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmrun.errors import VmrunError

FORWARD_RE = re.compile(r"tcp:(?:(?P<addr>[0-9.]+):)?(?P<host>\d+|auto):22")


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path


def target(vm: Any) -> SshTarget:
    """Where ``vm`` (an :class:`vmrun.instances.RunningVm`) takes ssh logins."""
    from vmrun.cloudinit import default_user, machine_dir, vmrun_key
    from vmrun.config import load_machine

    machine = vm.state.get("machine")
    if not machine:
        raise VmrunError(f"{vm.name}: its state does not say which machine file it runs")
    cfg = load_machine(machine)
    host, port = None, None
    for dev_id, placed in cfg.devices.items():
        for fwd in (getattr(placed, "options", {}) or {}).get("forward") or ():
            m = FORWARD_RE.fullmatch(str(fwd))
            if m:
                host = m.group("addr") or "127.0.0.1"
                picked = (vm.state.get("forwards") or {}).get(f"{dev_id}:tcp:22")
                port = int(picked) if m.group("host") == "auto" and picked else \
                    int(m.group("host")) if m.group("host") != "auto" else None
                break
        if host:
            break
    if host is None or port is None:
        raise VmrunError(f"{vm.name}: no NIC forwards a host port to the guest's port 22 "
                         '(add forward = ["tcp:127.0.0.1:2222:22"] to its user-mode NIC)')
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    user = cfg.cloud_init.user if cfg.cloud_init is not None else default_user()
    return SshTarget(host, port, user, vmrun_key(), machine_dir(cfg.name) / "known_hosts")


def wait_for_sshd(host: str, port: int, timeout: float, on_wait=None) -> None:
    """Until something on host:port greets with an SSH banner (cloud images start sshd late
    in their first boot); VmrunError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    last = "nothing listens"
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(10)
                banner = s.recv(256)
                if banner.startswith(b"SSH-"):
                    return
                last = "the port answers, but not with an ssh banner yet"
        except OSError as e:
            last = e.strerror or str(e)
        if time.monotonic() >= end:
            raise VmrunError(f"no sshd on {host}:{port} after {timeout:.0f} s ({last})")
        if on_wait is not None:
            on_wait(last)
        time.sleep(1.0)


def ssh_argv(t: SshTarget, command: tuple[str, ...]) -> list[str]:
    ssh = shutil.which("ssh")
    if ssh is None:
        raise VmrunError("ssh is missing: install the Debian package openssh-client "
                         "(make deps does)")
    t.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    return [ssh, "-i", str(t.key), "-p", str(t.port),
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={t.known_hosts}", "-o", "LogLevel=ERROR",
            f"{t.user}@{t.host}", *command]
