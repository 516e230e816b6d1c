"""``vmrun ssh NAME``: the target from the running VM's state (its machine file, the ``auto``
port vmrun chose, the cloud-init user, vmrun's key), the wait for sshd's banner, and the
``ssh`` it runs (a stand-in on PATH records its arguments)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmrun import instances
from vmrun import ssh as vmssh
from vmrun.errors import VmrunError
from vmrun.net.passt import parse_forward, resolve_auto
from vmrun.testing import kernels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("VMRUN_STATE_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def machine(tmp_path: Path, forward: str = "tcp:127.0.0.1:auto:22") -> Path:
    (tmp_path / "vmlinux").write_bytes(kernels.pvh_elf("poweroff"))
    f = tmp_path / "web.toml"
    f.write_text(f'name = "web"\n[boot]\nkernel = "vmlinux"\n[devices.net]\n'
                 f'model = "virtio-net"\nbackend = "user"\nforward = ["{forward}"]\n'
                 '[cloud-init]\nuser = "dev"\n')
    return f


class Sshd:
    """A loopback listener that greets like sshd after ``ready_after`` connections."""

    def __init__(self, ready_after: int = 0) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ready_after = ready_after
        self.seen = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                self.seen += 1
                c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" if self.seen > self.ready_after
                          else b"not yet\r\n")

    def close(self) -> None:
        self.sock.close()


def test_auto_forwards_get_a_free_port() -> None:
    f = parse_forward("tcp:127.0.0.1:auto:22")
    assert f.host_port == 0 and f.guest_port == 22
    (r,) = resolve_auto([f])
    assert 1024 <= r.host_port <= 65535 and r.guest_port == 22
    with pytest.raises(ValueError, match="not a number"):
        parse_forward("tcp:127.0.0.1:22:auto")


def test_the_target_comes_from_the_vms_state(tmp_path: Path) -> None:
    inst = instances.claim("web")
    try:
        inst.write_state(machine=str(machine(tmp_path)), forwards={"net:tcp:22": 40222})
        t = vmssh.target(instances.find("web"))
        assert (t.host, t.port, t.user) == ("127.0.0.1", 40222, "dev")
        assert t.key.exists() and t.key.with_suffix(".pub").exists()
    finally:
        inst.release()
    with pytest.raises(VmrunError, match="no VM named web is running"):
        instances.find("web")


def test_a_vm_without_an_ssh_forward_is_one_line(tmp_path: Path) -> None:
    inst = instances.claim("web")
    try:
        inst.write_state(machine=str(machine(tmp_path, "tcp:127.0.0.1:8080:80")))
        with pytest.raises(VmrunError, match="no NIC forwards a host port to the guest's "
                                             "port 22"):
            vmssh.target(instances.find("web"))
    finally:
        inst.release()


def test_wait_for_sshd_waits_for_the_banner() -> None:
    sshd = Sshd(ready_after=2)
    waits: list[str] = []
    try:
        vmssh.wait_for_sshd("127.0.0.1", sshd.port, 30, waits.append)
    finally:
        sshd.close()
    assert sshd.seen == 3 and waits == ["the port answers, but not with an ssh banner yet"] * 2


def test_wait_for_sshd_gives_up_with_one_line() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with pytest.raises(VmrunError, match=rf"no sshd on 127\.0\.0\.1:{port} after 1 s"):
        vmssh.wait_for_sshd("127.0.0.1", port, 1)
    assert time.monotonic() - t0 < 10


def test_cli_runs_ssh_with_the_key_port_and_user(tmp_path: Path) -> None:
    sshd = Sshd()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "argv"
    fake = bindir / "ssh"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\nexit 7\n")
    fake.chmod(0o755)
    inst = instances.claim("web")
    try:
        inst.write_state(machine=str(machine(tmp_path)), forwards={"net:tcp:22": sshd.port})
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
               "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-m", "vmrun", "ssh", "web", "--", "uname",
                              "-a"], capture_output=True, text=True, env=env, timeout=60)
    finally:
        inst.release()
        sshd.close()
    assert out.returncode == 7, out.stderr            # ssh's own exit code comes back
    argv = record.read_text().splitlines()
    key = tmp_path / "data" / "vmrun" / "ssh" / "id_ed25519"
    assert argv[:4] == ["-i", str(key), "-p", str(sshd.port)]
    assert argv[-3:] == ["dev@127.0.0.1", "uname", "-a"]
    assert f"UserKnownHostsFile={tmp_path}/data/vmrun/machines/web/known_hosts" in argv


def test_cli_ssh_to_a_vm_that_does_not_run_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vmrun", "ssh", "nothere"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 4
    assert out.stderr.strip().splitlines()[-1] == ("vmrun: no VM named nothere is running "
                                                   "(see `vmrun ps`)")
