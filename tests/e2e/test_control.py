"""The control socket against the default Linux guest: one boot, in three parts that a shared
boot can lift (see the lead's note):

1. :func:`control_cmdline` is what this boot adds to machines/tiny.toml's command line: a
   ``run=`` watcher (busybox's /init runs it) that powers the guest off when its ACPI power
   button input device reports a key, as acpid would. No devices, no host-side set-up.
2. :func:`drive_control` drives the running guest over QMP with ``qemu.qmp``: ``stop``
   (a command typed on the console gets no answer while paused), ``cont`` (the answer comes),
   then ``system_powerdown`` with ``vmrun stop`` racing it: the guest powers off through ACPI.
   It ends the boot, so in a shared boot it runs last.
3. The ``test_*`` checks read what it recorded: events, the console, exit codes.

Verdicts are host-side: the pause is seen as a console that stays silent, the power-off as
vmrun's exit code 1 and QMP's SHUTDOWN event with ``"guest": true``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.harness import GuestRun, require_guest_image, tiny_cmdline

pytestmark = pytest.mark.e2e

NAME = "e2e-control"
WATCHER = ("for e in /sys/class/input/event*; do grep -q 'Power Button' $e/device/name && "
           "(dd if=/dev/input/${e##*/} bs=24 count=1 >/dev/null 2>&1; "
           "echo vmrun-e2e: power button pressed; poweroff) & done; "
           "echo vmrun-e2e: watcher armed")


def control_cmdline() -> str:
    """Part 1: the kernel command line's addition (busybox /init runs ``run``)."""
    return f' run="{WATCHER}"'


@dataclass
class ControlResult:
    qmp_path: Path | None = None
    events: list[dict] = field(default_factory=list)
    status_paused: str = ""
    silent_while_paused: bytes = b""
    answered_after_cont: bool = False
    powered_off_console: bool = False
    stop_cli: subprocess.CompletedProcess | None = None
    returncode: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def drive_control(run: GuestRun, name: str = NAME) -> ControlResult:
    """Part 2: drive the guest at its shell over QMP; ends the boot (power-off)."""
    from qemu.qmp import QMPClient

    from vmrun import instances

    res = ControlResult()
    vm = instances.find(name)
    res.qmp_path = vm.qmp_path

    async def session() -> None:
        c = QMPClient("e2e")
        await c.connect(str(vm.qmp_path))
        try:
            with c.listener(("STOP", "RESUME", "POWERDOWN", "SHUTDOWN")) as events:
                t0 = time.monotonic()
                await c.execute("stop")
                res.events.append(await asyncio.wait_for(events.get(), 30))
                res.seconds["stop"] = time.monotonic() - t0
                res.status_paused = (await c.execute("query-status"))["status"]
                mark = len(run.console)
                run.send(b"echo tok$((40+2))\r")
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    run._pump(0.2)
                res.silent_while_paused = run.console[mark:]
                await c.execute("cont")
                res.events.append(await asyncio.wait_for(events.get(), 30))
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: run.wait_for(r"tok42", 120))
                res.answered_after_cont = True
                t0 = time.monotonic()
                stop_cli = subprocess.Popen(
                    [sys.executable, "-m", "vmrun", "stop", "--timeout", "240", name],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                await c.execute("system_powerdown")
                res.events.append(await asyncio.wait_for(events.get(), 30))
                while len(res.events) < 4:
                    ev = await asyncio.wait_for(events.get(), 300)
                    if ev["event"] != "POWERDOWN":        # vmrun stop pressed it too
                        res.events.append(ev)
                res.seconds["powerdown"] = time.monotonic() - t0
                out, err = stop_cli.communicate(timeout=300)
                res.stop_cli = subprocess.CompletedProcess(stop_cli.args, stop_cli.returncode,
                                                           out, err)
        finally:
            try:
                await c.disconnect()
            except EOFError:
                pass

    asyncio.run(asyncio.wait_for(session(), 900))
    res.returncode = run.wait_exit(120)
    res.powered_off_console = b"vmrun-e2e: power button pressed" in run.console
    return res


def machine_file(path: Path, kernel: Path, initrd: Path) -> Path:
    cmdline = tiny_cmdline() + control_cmdline()
    path.write_text(f'''name = "{NAME}"
cpus = 1
memory = "256M"
on_reboot = "exit"
[cpu]
profile = "compat"
[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = {json.dumps(cmdline)}
[serial.com1]
backend = "stdio"
''')
    return path


@pytest.fixture(scope="module")
def control_boot(tmp_path_factory) -> tuple[GuestRun, ControlResult]:
    kernel, initrd = require_guest_image()
    d = tmp_path_factory.mktemp("control")
    run = GuestRun(machine_file(d / "control.toml", kernel, initrd))
    try:
        m = run.wait_for(r"vmrun-init: user space is up|Kernel panic[^\n]*")
        if b"user space is up" not in m.group(0):
            pytest.fail(f"the guest did not reach user space: {m.group(0)!r}")
        run.wait_for(r"vmrun-e2e: watcher armed", 300)
        run.send(b"\r")
        run.wait_for(r"[#$] $", 300)
        res = drive_control(run)
        yield run, res
    finally:
        run.close()


def test_stop_pauses_the_guest_and_cont_resumes_it(control_boot) -> None:
    run, res = control_boot
    assert [e["event"] for e in res.events[:2]] == ["STOP", "RESUME"], res.events
    assert res.status_paused == "paused"
    assert b"tok42" not in res.silent_while_paused
    assert res.answered_after_cont


def test_system_powerdown_powers_the_linux_guest_off(control_boot) -> None:
    run, res = control_boot
    assert [e["event"] for e in res.events[2:]] == ["POWERDOWN", "SHUTDOWN"], res.events
    assert res.events[3]["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert res.powered_off_console, run.tail()
    assert res.returncode == 1, run.log                    # ACPI S5, not a forced end


def test_vmrun_stop_reports_the_power_off(control_boot) -> None:
    run, res = control_boot
    assert res.stop_cli is not None
    assert res.stop_cli.returncode == 0, res.stop_cli.stderr
    assert re.search(rf"{NAME} (powered off|stopped)", res.stop_cli.stderr), res.stop_cli.stderr
    assert res.qmp_path is not None and not res.qmp_path.exists()
