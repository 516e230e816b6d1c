"""Background VMs: ``vmrun up -d``, ``ps``, ``stop``, ``kill``, ``console`` and ``logs``.

``up -d`` checks the machine file here (one line, exit 4, as ``up``), then starts
``vmrun up --detached-child FD FILE`` in a session of its own, with no terminal. The child
claims the VM's state directory (:mod:`vmrun.instances`), sends its output to the log there,
puts the serial port that would have been on stdio on ``console.sock`` (or a pty) and, once
the vCPUs run, writes ``ok`` to FD; an error before that comes back on FD as one line. So
``up -d`` returns when the VM is running (or fails with the reason) and prints its name.

Everything else finds the VM by name in the state directories and talks to its QMP socket.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
import termios
import time
import tty
from pathlib import Path

from vmrun import instances
from vmrun.config import MachineConfig, SerialConfig
from vmrun.errors import VmrunError, one_line

START_TIMEOUT_S = 120.0    # from spawning the child to running vCPUs (the kvm-pvm probe too)
STOP_GRACE_S = 30.0
CTRL_A = 0x01


def console_config(cfg: MachineConfig, inst: instances.Instance,
                   mode: str) -> tuple[MachineConfig, str]:
    """The machine with its stdio port moved to the detached console, and how ``vmrun
    console`` reaches it (``socket:PATH`` or ``pty``, filled in with the pty's name later;
    empty when no port is on stdio and none is on a socket or pty)."""
    serial = dict(cfg.serial)
    for port, sc in serial.items():
        if sc.backend == "stdio":
            if mode == "pty":
                serial[port] = SerialConfig("pty")
                return dataclasses.replace(cfg, serial=serial), f"pty:{port}"
            serial[port] = SerialConfig("socket", inst.console_path)
            return dataclasses.replace(cfg, serial=serial), f"socket:{inst.console_path}"
    for port, sc in serial.items():
        if sc.backend == "socket":
            return cfg, f"socket:{sc.path}"
        if sc.backend == "pty":
            return cfg, f"pty:{port}"
    return cfg, ""


def qmp_path(cfg: MachineConfig, inst: instances.Instance) -> Path:
    return cfg.control_socket or inst.qmp_path


# -- up -d: the parent --------------------------------------------------------------------------
def start_detached(machine_file: Path, cfg: MachineConfig, console: str, verbose: bool,
                   restore: Path | None = None, timeout: float = START_TIMEOUT_S) -> str:
    """Start the VM in the background; returns once it runs. VmrunError otherwise."""
    d = instances.state_root() / cfg.name
    if instances.is_running(d):
        raise VmrunError(f"a VM named {cfg.name} is already running; `vmrun stop "
                         f"{cfg.name}` ends it")
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "vmrun", "up", "--detached-child", str(w),
           "--console", console, *(["-v"] if verbose else []),
           *(["--restore", str(restore)] if restore is not None else []), str(machine_file)]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        os.close(w)
    try:
        got = b""
        deadline = time.monotonic() + timeout
        while not got.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise VmrunError(f"{cfg.name}: the VM did not start within {timeout:g}s "
                                 f"(see `vmrun logs {cfg.name}`)")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                break
            got += chunk
    finally:
        os.close(r)
    line = got.decode(errors="replace").strip()
    if line == "ok":
        return cfg.name
    if line.startswith("error: "):
        proc.wait(10)
        raise VmrunError(line[len("error: "):])
    code = proc.wait(30)
    raise VmrunError(f"{cfg.name}: the VM ended (exit {code}) before it ran"
                     + _last_log_line(d / "log"))


def _last_log_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return f": {one_line(lines[-1])}" if lines else ""


# -- the VM's own process (foreground up, and the detached child) ------------------------------
def run_vm(cfg: MachineConfig, log, *, ready_fd: int | None = None,
           console_mode: str = "socket", runner_box: list | None = None,
           restore: Path | None = None):
    """Claim the name, serve QMP, run the VM; returns the runner's ExitInfo."""
    from vmrun.runner import Runner

    def tell(text: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, one_line(text).encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

    try:
        inst = instances.claim(cfg.name)
    except VmrunError as e:
        tell(f"error: {e}")
        raise
    try:
        console = "stdio"
        if ready_fd is not None:
            fd = os.open(inst.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o600)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            cfg, console = console_config(cfg, inst, console_mode)
        control = qmp_path(cfg, inst)
        state = dict(machine=str(cfg.path.absolute()), cpus=cfg.cpus, memory=cfg.memory,
                     qmp=str(control), console=console)
        inst.write_state(**state)
        runner: Runner

        def started() -> None:
            if runner.host.published:
                state["forwards"] = dict(runner.host.published)
            if console.startswith("pty:"):
                backend = runner.serial.get(console[4:])
                state["console"] = f"pty:{getattr(backend, 'path', '')}"
            inst.write_state(**state)
            tell("ok")

        runner = Runner(cfg, log=log, control_socket=control, on_started=started,
                        restore=restore)
        if runner_box is not None:
            runner_box.append(runner)
        try:
            info = runner.run()
        except BaseException as e:
            tell(f"error: {e}")
            raise
        if ready_fd is not None:
            tell(f"error: {cfg.name}: {info.reason.partition(chr(10))[0]}")
        return info
    finally:
        inst.release()


# -- ps -----------------------------------------------------------------------------------------
def _uptime(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def status_of(vm: instances.RunningVm, timeout: float = 2.0) -> str:
    from vmrun.qmp.client import QmpClient

    try:
        with QmpClient(vm.qmp_path, timeout=timeout) as c:
            return str(c.execute("query-status").get("status", "?"))
    except (VmrunError, OSError):
        return "starting" if not vm.state.get("console") and not vm.qmp_path.exists() \
            else "unknown"


def ps_rows() -> list[list[str]]:
    rows = []
    for vm in instances.running():
        st = vm.state
        mem = st.get("memory")
        started = st.get("started")
        rows.append([vm.name, status_of(vm), str(st.get("cpus", "?")),
                     f"{int(mem) >> 20} MiB" if mem else "?",
                     _uptime(time.time() - float(started)) if started else "?",
                     str(vm.pid or "?"), vm.console or "-"])
    return rows


# -- stop, kill -----------------------------------------------------------------------------------
def wait_gone(vm: instances.RunningVm, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while instances.is_running(vm.dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop(name: str, force: bool, grace: float = STOP_GRACE_S) -> str:
    """The ACPI power button, then ``quit`` after ``grace`` seconds (at once with force),
    then SIGKILL if even that is not heard. Returns a one-line account."""
    from vmrun.qmp.client import QmpClient

    vm = instances.find(name)
    try:
        with QmpClient(vm.qmp_path) as c:
            if force:
                c.execute("quit")
            else:
                if c.execute("query-status").get("status") == "paused":
                    c.execute("cont")       # a paused guest cannot answer the button
                c.execute("system_powerdown")
    except (VmrunError, OSError) as e:
        if not instances.is_running(vm.dir):
            return f"{name} stopped"
        if not force:
            raise VmrunError(f"{name}: {one_line(e)} (`vmrun stop --force {name}` or "
                             f"`vmrun kill {name}`)") from None
        return kill(name)
    if force:
        if wait_gone(vm, 10):
            return f"{name} stopped (quit)"
        return kill(name)
    if wait_gone(vm, grace):
        return f"{name} powered off"
    try:
        with QmpClient(vm.qmp_path) as c:
            c.execute("quit")
    except (VmrunError, OSError):
        pass
    if wait_gone(vm, 10):
        return f"{name} did not power off within {grace:g}s: ended (quit)"
    return kill(name)


def kill(name: str) -> str:
    """SIGKILL the VM's vmrun; what it leaves is cleaned at once (and would be by the next
    ``up`` anyway)."""
    vm = instances.find(name)
    if vm.pid <= 0:
        raise VmrunError(f"{name}: no pid recorded in {vm.dir}")
    try:
        os.kill(vm.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if not wait_gone(vm, 10):
        raise VmrunError(f"{name}: pid {vm.pid} did not die")
    instances._remove_state(vm.dir)
    return f"{name} killed"


# -- console --------------------------------------------------------------------------------------
def open_console(vm: instances.RunningVm) -> int:
    import socket

    spec = vm.console
    if spec.startswith("socket:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(spec[len("socket:"):])
        except OSError as e:
            s.close()
            raise VmrunError(f"{vm.name}: cannot connect to the console "
                             f"{spec[7:]}: {e.strerror}") from None
        return s.detach()
    if spec.startswith("pty:/"):
        try:
            return os.open(spec[4:], os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:
            raise VmrunError(f"{vm.name}: cannot open the console {spec[4:]}: "
                             f"{e.strerror}") from None
    if spec == "stdio":
        raise VmrunError(f"{vm.name}: its console is the terminal it was started on")
    raise VmrunError(f"{vm.name}: has no serial console to attach to")


def console(name: str, stdin: int = 0, stdout: int = 1) -> str:
    """Relay the terminal and the VM's serial console until C-a d (detach), C-a x (quit
    the VM) or the VM's end. Returns how it ended, one line."""
    from vmrun.qmp.client import QmpClient

    vm = instances.find(name)
    fd = open_console(vm)
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    os.write(2, f"vmrun: attached to {name} (C-a d detaches, C-a x quits the VM)\r\n".encode())
    escape = False
    how = "detached"
    try:
        while True:
            ready, _, _ = select.select([stdin, fd], [], [])
            if fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    how = "the VM ended"
                    break
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    break
                out = bytearray()
                for b in data:
                    if escape:
                        escape = False
                        if b in (ord("d"), ord("D")):
                            os.write(fd, bytes(out))
                            return "detached"
                        if b in (ord("x"), ord("X")):
                            os.write(fd, bytes(out))
                            with QmpClient(vm.qmp_path) as c:
                                c.execute("quit")
                            return "quit the VM"
                        if b != CTRL_A:
                            out.append(CTRL_A)
                        out.append(b)
                    elif b == CTRL_A:
                        escape = True
                    else:
                        out.append(b)
                if out:
                    os.write(fd, bytes(out))
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSAFLUSH, saved)
        os.close(fd)
    return how
