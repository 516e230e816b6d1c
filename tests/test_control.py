"""The control socket and background VMs on KVM, with a tiny purpose-made guest
(:func:`vmrun.testing.kernels.console_pvh`: a banner on COM1, typed bytes echoed with their
case swapped, S5 on the ACPI power button, asleep in ``hlt`` otherwise), run by the real
``vmrun up -d`` and driven by clients nobody here wrote: ``qemu.qmp`` from PyPI and socat.
Verdicts come from the host: the guest's echo stops while it is paused, its banner comes
back after a reset, the process ends with the exit code of a power-off."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmrun import instances
from vmrun.config import parse_machine
from vmrun.errors import ConfigError
from vmrun.testing import kernels

KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
kvm_only = pytest.mark.skipif(not KVM, reason="no /dev/kvm")
SPIN_PVH = kernels.pvh_elf("poweroff").replace(kernels.ENDINGS_32["poweroff"],
                                               b"\xeb\xfe" + kernels.ENDINGS_32["poweroff"][2:])


def vmrun(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmrun", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def machine(tmp_path: Path, name: str, kernel: bytes | None = None, extra: str = "",
            serial: str = 'backend = "stdio"') -> Path:
    k = tmp_path / f"{name}.vmlinux"
    k.write_bytes(kernel if kernel is not None else kernels.console_pvh())
    f = tmp_path / f"{name}.toml"
    f.write_text(f'name = "{name}"\nmemory = "64M"\non_reboot = "restart"\n{extra}\n'
                 f'[boot]\nkernel = "{k}"\n[serial.com1]\n{serial}\n')
    return f


@pytest.fixture
def up(tmp_path: Path):
    """``up(name, ...)`` starts a background VM and returns its RunningVm; every VM a test
    started is gone after it."""
    names: list[str] = []

    def start(name: str, *args: str, **kw) -> instances.RunningVm:
        f = machine(tmp_path, name, **kw)
        out = vmrun("up", "-d", *args, str(f))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == name
        names.append(name)
        return instances.find(name)

    yield start
    for name in names:
        try:
            vm = instances.find(name)
        except Exception:
            continue
        os.kill(vm.pid, signal.SIGKILL)


class Console:
    """The VM's console socket, read on demand."""

    def __init__(self, vm: instances.RunningVm) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(vm.console.removeprefix("socket:"))
        self.sock.setblocking(False)
        self.data = b""

    def read_for(self, seconds: float) -> bytes:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.data += chunk
        return self.data

    def wait_for(self, want: bytes, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while want not in self.data:
            assert time.monotonic() < end, f"no {want!r} on the console: {self.data!r}"
            self.read_for(0.1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


async def _qmp_session(path: Path, script):
    from qemu.qmp import QMPClient

    client = QMPClient("test")
    await client.connect(str(path))
    try:
        return await script(client)
    finally:
        try:
            await client.disconnect()
        except EOFError:       # the VM ended and closed the socket (quit, power-off)
            pass


def qmp(path: Path, script):
    return asyncio.run(asyncio.wait_for(_qmp_session(path, script), 60))


def wait_gone(vm: instances.RunningVm, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while instances.is_running(vm.dir):
        assert time.monotonic() < end, f"{vm.name} still runs"
        time.sleep(0.05)


# -- qemu.qmp against a real VM ----------------------------------------------------------------
@kvm_only
def test_qemu_qmp_drives_a_background_vm(tmp_path: Path, up) -> None:
    vm = up("qa", extra="cpus = 2")
    assert vm.qmp_path == instances.state_root() / "qa" / "qmp.sock"
    assert oct(vm.qmp_path.stat().st_mode & 0o777) == "0o600"
    con = Console(vm)

    async def script(c):
        greeting = c.greeting
        assert greeting is not None and greeting.QMP.version["package"].startswith("vmrun")
        out = {}
        for cmd in ("query-status", "query-name", "query-uuid", "query-version",
                    "query-cpus-fast", "query-pci", "query-block", "query-commands"):
            out[cmd] = await c.execute(cmd)
        return out

    got = qmp(vm.qmp_path, script)
    assert got["query-status"]["status"] == "running" and got["query-status"]["running"]
    assert got["query-name"] == {"name": "qa"}
    assert len(got["query-uuid"]["UUID"]) == 36
    cpus = got["query-cpus-fast"]
    assert [c["cpu-index"] for c in cpus] == [0, 1]
    tasks = os.listdir(f"/proc/{vm.pid}/task")
    assert all(str(c["thread-id"]) in tasks for c in cpus)     # real host threads
    pci = got["query-pci"][0]["devices"]
    assert {(d["slot"], d["qdev_id"]) for d in pci} >= {(0, "hostbridge"), (31, "lpc")}
    assert got["query-block"] == []
    assert "system_powerdown" in {x["name"] for x in got["query-commands"]}

    # stop really parks the vCPUs: the guest's echo stops, and comes back with cont.
    async def pause(c):
        with c.listener(("STOP", "RESUME")) as events:
            await c.execute("stop")
            stop = await asyncio.wait_for(events.get(), 10)
            status = await c.execute("query-status")
            con.send(b"ping")
            await asyncio.sleep(1.5)
            silent = con.read_for(0.1)
            await c.execute("cont")
            resume = await asyncio.wait_for(events.get(), 10)
        return stop, status, silent, resume

    stop, status, silent, resume = qmp(vm.qmp_path, pause)
    assert stop["event"] == "STOP" and set(stop["timestamp"]) == {"seconds", "microseconds"}
    assert status["status"] == "paused" and not status["running"]
    assert b"PING" not in silent
    assert resume["event"] == "RESUME"
    con.wait_for(b"PING")

    # system_reset: a RESET event and a fresh boot (the banner again).
    async def reset(c):
        with c.listener("RESET") as events:
            await c.execute("system_reset")
            return await asyncio.wait_for(events.get(), 10)

    con.data = b""
    ev = qmp(vm.qmp_path, reset)
    assert ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    con.close()
    con = Console(vm)                  # the new boot's UART, same socket
    con.send(b"abc")
    con.wait_for(b"ABC")

    # system_powerdown: the guest honours the ACPI button; POWERDOWN then SHUTDOWN.
    async def powerdown(c):
        with c.listener(("POWERDOWN", "SHUTDOWN")) as events:
            await c.execute("system_powerdown")
            first = await asyncio.wait_for(events.get(), 10)
            second = await asyncio.wait_for(events.get(), 20)
        return first, second

    first, second = qmp(vm.qmp_path, powerdown)
    assert first["event"] == "POWERDOWN"
    assert second["event"] == "SHUTDOWN"
    assert second["data"] == {"guest": True, "reason": "guest-shutdown"}
    wait_gone(vm)
    assert not vm.qmp_path.exists() and not (vm.dir / "pid").exists()
    con.close()


@kvm_only
def test_quit_errors_and_a_disk_through_qemu_qmp(tmp_path: Path, request) -> None:
    from qemu.qmp import ExecuteError

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    f = machine(tmp_path, "qc", serial='backend = "null"')
    f.write_text(f.read_text() + f'[devices.disk0]\nmodel = "virtio-blk"\npath = "{disk}"\n'
                 'ro = true\n')
    out = vmrun("up", "-d", str(f))
    assert out.returncode == 0, out.stderr
    vm = instances.find("qc")
    request.addfinalizer(lambda: vmrun("kill", "qc"))

    async def script(c):
        block = await c.execute("query-block")
        errors = []
        for cmd, args in (("no-such-command", None), ("query-status", {"x": 1})):
            try:
                await c.execute(cmd, args)
            except ExecuteError as e:
                errors.append((e.error_class, e.error.error.desc))
        with c.listener("SHUTDOWN") as events:
            assert await c.execute("quit") == {}
            shutdown = await asyncio.wait_for(events.get(), 10)
        return block, errors, shutdown

    block, errors, shutdown = qmp(vm.qmp_path, script)
    assert block == [{"device": "disk0", "qdev": "disk0", "locked": False, "removable": False,
                      "type": "unknown", "tray_open": False,
                      "inserted": {"file": str(disk), "ro": True, "drv": "raw",
                                   "backing_file_depth": 0, "encrypted": False,
                                   "detect_zeroes": "off"}}]
    assert errors == [("CommandNotFound", "The command no-such-command has not been found"),
                      ("GenericError", "Parameter 'x' is unexpected")]
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    wait_gone(vm)


@kvm_only
def test_socat_by_hand(up) -> None:
    vm = up("qs", serial='backend = "null"')
    lines = ('{"execute": "qmp_capabilities"}\n{"execute": "query-name", "id": 7}\n'
             'not json\n{"execute": "stop"}\n{"execute": "cont"}\n')
    out = subprocess.run(["socat", "-t", "2", "-", f"UNIX-CONNECT:{vm.qmp_path}"],
                         input=lines.encode(), capture_output=True, timeout=30)
    assert out.stdout.endswith(b"}\r\n")                  # QEMU's framing
    msgs = [json.loads(x) for x in out.stdout.splitlines()]
    assert "QMP" in msgs[0]
    assert msgs[1] == {"return": {}}
    assert msgs[2] == {"return": {"name": "qs"}, "id": 7}
    assert msgs[3]["error"]["class"] == "GenericError"
    kinds = [m.get("event") or ("return" if "return" in m else "?") for m in msgs[4:]]
    assert kinds == ["STOP", "return", "RESUME", "return"]


@kvm_only
def test_hostile_clients_against_a_running_vm(up) -> None:
    vm = up("qh")
    con = Console(vm)
    socks = []
    for i in range(40):                 # more than MAX_CLIENTS, none of them reading
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(vm.qmp_path))
        s.setblocking(False)
        try:
            s.send([b"{" * 100, b"x" * 100000, b'{"execute": "qmp_capabilities"}' * 50,
                    b"\xff\xfe\x00garbage\n"][i % 4])
        except OSError:
            pass
        socks.append(s)
    con.send(b"still")
    con.wait_for(b"STILL")              # the VM runs on
    for s in socks:
        s.close()

    async def script(c):
        return await c.execute("query-status")

    assert qmp(vm.qmp_path, script)["status"] == "running"
    con.close()


# -- background VMs: the CLI ----------------------------------------------------------------------
@kvm_only
def test_up_d_ps_logs_names_and_stop(tmp_path: Path, up) -> None:
    vm = up("bg1", extra="cpus = 2")
    assert (vm.dir / "pid").read_text().strip() == str(vm.pid)
    assert vm.console == f"socket:{vm.dir / 'console.sock'}"
    ps = vmrun("ps", env={**os.environ, "COLUMNS": "200"})
    assert ps.returncode == 0
    row = next(line for line in ps.stdout.splitlines() if " bg1 " in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:4] == ["bg1", "running", "2", "64 MiB"] and cells[5] == str(vm.pid)
    # The same name twice: one line, exit 4, the first VM untouched.
    again = vmrun("up", "-d", str(machine(tmp_path, "bg1")))
    assert again.returncode == 4
    assert again.stderr.count("\n") == 1 and "already running" in again.stderr
    fg = vmrun("up", str(machine(tmp_path, "bg1")))
    assert fg.returncode == 4 and "already running" in fg.stderr
    assert instances.find("bg1").pid == vm.pid
    for args in (("stop", "nope"), ("kill", "nope"), ("console", "nope"), ("logs", "nope"),
                 ("stop", "bad/name"), ("stop",)):
        bad = vmrun(*args)
        assert bad.returncode == 4 and bad.stderr.count("\n") == 1, (args, bad.stderr)
    stop = vmrun("stop", "bg1")
    assert stop.returncode == 0 and "bg1 powered off" in stop.stderr
    assert "bg1" not in vmrun("ps").stdout
    logs = vmrun("logs", "bg1")
    assert logs.returncode == 0            # the log outlives the VM


@kvm_only
def test_stop_falls_back_to_quit_and_force(up) -> None:
    vm = up("bg2", kernel=SPIN_PVH)        # ignores the power button
    t0 = time.monotonic()
    out = vmrun("stop", "--timeout", "1", "bg2")
    assert out.returncode == 0 and "did not power off within 1s" in out.stderr
    assert time.monotonic() - t0 < 15
    wait_gone(vm)
    vm = up("bg2")
    from vmrun.qmp.client import QmpClient

    with QmpClient(vm.qmp_path) as c:
        c.execute("stop")
    out = vmrun("stop", "--timeout", "20", "bg2")   # paused: resumed, then the button
    assert out.returncode == 0 and "bg2 powered off" in out.stderr, out.stderr
    wait_gone(vm)
    vm = up("bg2", kernel=SPIN_PVH)
    out = vmrun("stop", "--force", "bg2")
    assert out.returncode == 0 and "stopped" in out.stderr
    wait_gone(vm)


@kvm_only
def test_kill_and_a_dead_vmrun_leave_nothing_that_blocks_the_next_up(up) -> None:
    vm = up("bg3")
    out = vmrun("kill", "bg3")
    assert out.returncode == 0 and "bg3 killed" in out.stderr
    assert not (vm.dir / "qmp.sock").exists()
    vm = up("bg3")
    os.kill(vm.pid, signal.SIGKILL)        # died without a word: stale pid and sockets
    deadline = time.monotonic() + 10
    while instances.is_running(vm.dir):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (vm.dir / "qmp.sock").exists() and (vm.dir / "console.sock").exists()
    assert "bg3" not in vmrun("ps").stdout
    vm2 = up("bg3")                         # the stale state is cleaned by the next up
    assert vm2.pid != vm.pid
    con = Console(vm2)
    con.send(b"ok")
    con.wait_for(b"OK")
    con.close()


@kvm_only
def test_console_attach_detach_and_quit_on_a_pty(up) -> None:
    vm = up("bg4")

    def attach() -> tuple[subprocess.Popen, int]:
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "vmrun", "console", "bg4"],
                                stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        return proc, master

    def read_until(master: int, want: bytes, timeout: float = 20) -> bytes:
        data = b""
        end = time.monotonic() + timeout
        while want not in data:
            assert time.monotonic() < end, data
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    data += os.read(master, 4096)
                except OSError:
                    break
        return data

    proc, master = attach()
    read_until(master, b"C-a d detaches")
    os.write(master, b"hello")
    read_until(master, b"HELLO")
    os.write(master, b"\x01d")                      # C-a d: detach, the VM runs on
    assert proc.wait(20) == 0
    os.close(master)
    assert instances.is_running(vm.dir)
    proc, master = attach()
    read_until(master, b"C-a d detaches")
    os.write(master, b"\x01\x01")                   # C-a C-a: a literal C-a (case-swapped: !)
    read_until(master, b"!")
    os.write(master, b"\x01x")                      # C-a x: quit the VM
    assert proc.wait(20) == 0
    os.close(master)
    wait_gone(vm)


@kvm_only
def test_up_d_reports_a_vm_that_fails_to_start_in_one_line(tmp_path: Path) -> None:
    busy = tmp_path / "busy.img"
    busy.write_bytes(bytes(1 << 20))
    from vmrun.block import RawFile

    f = machine(tmp_path, "bg5", serial='backend = "null"')
    f.write_text(f.read_text() + f'[devices.d]\nmodel = "virtio-blk"\npath = "{busy}"\n')
    with RawFile(busy):                             # another user holds the write lock
        out = vmrun("up", "-d", str(f))
    assert out.returncode == 4
    assert out.stderr.count("\n") == 1 and "in use" in out.stderr, out.stderr
    assert "bg5" not in vmrun("ps").stdout


@kvm_only
def test_control_socket_from_the_machine_file_and_pty_console(tmp_path: Path, up) -> None:
    sock = tmp_path / "ctl.sock"
    vm = up("bg6", "--console", "pty", extra=f'control_socket = "{sock}"')
    assert vm.qmp_path == sock and sock.is_socket()
    assert vm.console.startswith("pty:/dev/pts/")
    fd = os.open(vm.console[4:], os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"xy")
        data = b""
        end = time.monotonic() + 20
        while b"XY" not in data:
            assert time.monotonic() < end, data
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                data += os.read(fd, 100)
    finally:
        os.close(fd)
    assert vmrun("stop", "bg6").returncode == 0
    wait_gone(vm)
    assert not sock.exists()


# -- the machine file's control_socket --------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    ('"{d}/nodir/q.sock"', "directory {d}/nodir does not exist"),
    ('"{d}/file"', "{d}/file exists and is not a socket"),
    ('"{d}/' + "x" * 120 + '"', "unix socket paths are at most 107 bytes"),
    ('"{d}/com1.sock"', "serial.com1 already uses it"),
    ("3", "must be a string (got 3)"),
    ('""', "must not be empty"),
])
def test_control_socket_key_errors_are_one_line(tmp_path: Path, value: str,
                                                message: str) -> None:
    (tmp_path / "file").write_text("x")
    k = tmp_path / "k"
    k.write_bytes(kernels.pvh_elf())
    text = (f'name = "t"\ncontrol_socket = {value.format(d=tmp_path)}\n[boot]\nkernel = "{k}"\n'
            f'[serial.com1]\nbackend = "socket"\npath = "{tmp_path}/com1.sock"\n')
    with pytest.raises(ConfigError) as e:
        parse_machine(text, tmp_path / "m.toml")
    assert "\n" not in str(e.value)
    assert f"control_socket: {message.format(d=tmp_path)}" in str(e.value)


def test_state_root_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMRUN_STATE_DIR", str(tmp_path / "s"))
    assert instances.state_root() == tmp_path / "s"
    monkeypatch.delenv("VMRUN_STATE_DIR")
    if os.geteuid() == 0:
        assert instances.state_root() == Path("/run/vmrun")
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        assert instances.state_root() == tmp_path / "vmrun"


def test_claim_is_exclusive_and_cleans_what_a_dead_owner_left(monkeypatch,
                                                              tmp_path: Path) -> None:
    from vmrun.errors import VmrunError

    monkeypatch.setenv("VMRUN_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(instances, "CLAIM_RETRY_S", 0.1)
    (tmp_path / "n").mkdir(mode=0o700)
    (tmp_path / "n" / "qmp.sock").write_text("stale")
    inst = instances.claim("n")
    assert not (tmp_path / "n" / "qmp.sock").exists()
    inst.write_state(cpus=1)
    assert [v.name for v in instances.running()] == ["n"]
    with pytest.raises(VmrunError, match=r"a VM named n is already running \(pid \d+\)"):
        instances.claim("n")
    inst.release()
    assert instances.running() == []
    instances.claim("n").release()


# -- pause on KVM, without the CLI ---------------------------------------------------------
@kvm_only
def test_vm_pause_parks_every_vcpu() -> None:
    from vmrun.core.exits import ExitCode
    from vmrun.testing import guests as g

    counter = 0x50000
    # 1: inc dword [counter]; jmp 1b  (on both vCPUs' view of one counter: the BSP only)
    code = b"\xff\x04\x25" + counter.to_bytes(4, "little") + b"\xeb\xf7"
    vm = g.long_mode_vm(code, irqchip=True)
    try:
        vm.start()
        time.sleep(0.3)
        assert vm.pause()
        a = int.from_bytes(vm.memory.read(counter, 4), "little")
        time.sleep(0.3)
        b = int.from_bytes(vm.memory.read(counter, 4), "little")
        assert a == b and a > 0
        vm.resume()
        time.sleep(0.3)
        assert int.from_bytes(vm.memory.read(counter, 4), "little") > b
        assert vm.pause()
        vm.request_exit(ExitCode.POWER_OFF, "test")   # ending while paused wakes them
        assert vm.wait(10) is not None
    finally:
        vm.close()


@pytest.mark.parametrize("args, message", [
    (("stop", "nope"), "no VM named nope is running (see `vmrun ps`)"),
    (("kill", "nope"), "no VM named nope is running"),
    (("console", "nope"), "no VM named nope is running"),
    (("snapshot", "nope", "/tmp/x.snap"), "no VM named nope is running"),
    (("logs", "nope"), "no log for a VM named nope"),
    (("stop", "bad/name"), "'bad/name' is not a VM name"),
    (("stop", "--timeout", "-1", "x"), "stop: --timeout: -1.0 is not in the range"),
    (("up", "--console", "tty", "m.toml"), "up: --console: 'tty' is not one of"),
    (("up", "--restore", "/nonexistent.snap", "m.toml"), "up: --restore: file "),
])
def test_background_cli_errors_are_one_line(args, message: str) -> None:
    out = vmrun(*args)
    assert out.returncode == 4
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
