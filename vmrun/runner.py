"""Run a machine file until the guest is done: serial backends, signals, reboots, exit code.

What happens on each way out:
- guest power-off (ACPI S5) -> 1; halt -> 2; triple fault -> 3; errors -> 4;
- guest reset -> boot again when ``on_reboot = "restart"`` (the default), else 0;
- Ctrl-A x on the stdio console -> 1 (the user pulled the plug);
- SIGTERM -> an ACPI power-button press; if the guest has not powered off after the grace
  period, the VM is ended (1). SIGINT reaches the guest as a byte on the console in raw mode
  and is only seen here when the terminal is not raw; it ends the VM like SIGTERM's second step.
The terminal is restored on every path (the stdio backend registers an atexit hook too).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable

from vmrun.chardev import Backend, open_backend
from vmrun.config import MachineConfig
from vmrun.core.exits import ExitCode
from vmrun.core.host import HostContext
from vmrun.core.vm import ExitInfo
from vmrun.machine import BootLog, Machine

SIGTERM_GRACE_S = 10.0


class Runner:
    def __init__(self, cfg: MachineConfig, log: Callable[[str], None] | None = None,
                 grace_s: float = SIGTERM_GRACE_S) -> None:
        self.cfg = cfg
        self.log = log or (lambda msg: print(f"vmrun: {msg}", file=sys.stderr))
        self.grace_s = grace_s
        self.machine: Machine | None = None
        self.boot_log = BootLog()
        self.boots = 0
        self._quit: tuple[ExitCode, str] | None = None
        self._lock = threading.Lock()

    def _open_serial(self) -> dict[str, Backend]:
        backends: dict[str, Backend] = {}
        try:
            for name, sc in self.cfg.serial.items():
                backends[name] = open_backend(name, sc.backend, sc.path, self.host.loop)
                backends[name].on_quit = lambda: self.quit(ExitCode.POWER_OFF,
                                                           "quit from the console (C-a x)")
        except BaseException:
            for b in backends.values():
                b.close()
            raise
        return backends

    def quit(self, code: ExitCode, reason: str) -> None:
        with self._lock:
            if self._quit is None:
                self._quit = (code, reason)
            m = self.machine
        if m is not None:
            m.stop(code, reason)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        m = self.machine
        if m is None or self._quit is not None:
            self.quit(ExitCode.POWER_OFF, f"signal {signum}")
            return
        self.log(f"signal {signum}: pressing the ACPI power button "
                 f"({self.grace_s:g}s before the VM is ended)")
        m.press_power_button()
        timer = threading.Timer(self.grace_s, self.quit,
                                (ExitCode.POWER_OFF, f"guest did not power off within "
                                 f"{self.grace_s:g}s of SIGTERM"))
        timer.daemon = True
        timer.start()

    def run(self) -> ExitInfo:
        # The host side first: the serial backends read their input on its event loop, which
        # runs from here on (Machine's host.start() finds it started).
        self.host = HostContext()
        self.host.start()
        try:
            serial = self._open_serial()
        except BaseException:
            self.host.close()
            raise
        old = {}
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                old[sig] = signal.signal(sig, self._on_sigterm)
        try:
            while True:
                machine = Machine(self.cfg, serial, self.boot_log, host=self.host)
                with self._lock:
                    self.machine = machine
                    pending = self._quit
                self.boots += 1
                try:
                    if pending is not None:
                        machine.stop(*pending)
                    machine.start()
                    info = None
                    while info is None:
                        info = machine.wait(0.5)   # wake up for signal handlers
                finally:
                    with self._lock:
                        self.machine = None
                    for line in machine.stats():
                        logging.getLogger("vmrun").debug("%s", line)
                    for b in serial.values():
                        b.detach()          # input typed now waits for the next boot's UART
                    machine.close()
                if self._quit is not None:
                    # The host asked (C-a x, SIGTERM): that is how this VM ended, even if the
                    # guest was resetting at the same moment.
                    return ExitInfo(*self._quit)
                if info.code == ExitCode.RESET and self.cfg.on_reboot == "restart":
                    self.log("guest reset: booting again")
                    continue
                return info
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            for b in serial.values():
                b.close()
            self.host.close()
