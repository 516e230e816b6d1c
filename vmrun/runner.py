"""Run a machine file until the guest is done: serial backends, signals, reboots, exit code.

What happens on each way out:
- guest power-off (ACPI S5) -> 1; halt -> 2; triple fault -> 3; errors -> 4;
- guest reset -> boot again when ``on_reboot = "restart"`` (the default), else 0;
- Ctrl-A x on the stdio console -> 1 (the user pulled the plug);
- SIGTERM -> an ACPI power-button press; if the guest has not powered off after the grace
  period, the VM is ended (1). SIGINT reaches the guest as a byte on the console in raw mode
  and is only seen here when the terminal is not raw; it ends the VM like SIGTERM's second step.
The terminal is restored on every path (the stdio backend registers an atexit hook too).

With ``control_socket``, the run serves QMP there (:mod:`vmrun.qmp`) and is its control
interface: :meth:`Runner.status`, :meth:`~Runner.pause` / :meth:`~Runner.resume` (the vCPUs
park outside KVM_RUN), :meth:`~Runner.powerdown`, :meth:`~Runner.system_reset`,
:meth:`~Runner.quit`; it emits QMP's STOP, RESUME, POWERDOWN, RESET and SHUTDOWN events.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from vmrun.chardev import Backend, open_backend
from vmrun.config import MachineConfig
from vmrun.core.exits import ExitCode
from vmrun.core.host import HostContext
from vmrun.core.vm import ExitInfo
from vmrun.errors import VmrunError
from vmrun.machine import BootLog, Machine

SIGTERM_GRACE_S = 10.0

# How each ending is reported in QMP's SHUTDOWN event (QEMU's ShutdownCause names).
_SHUTDOWN_REASONS = {ExitCode.POWER_OFF: "guest-shutdown", ExitCode.RESET: "guest-reset",
                     ExitCode.HALT: "guest-shutdown", ExitCode.TRIPLE_FAULT: "guest-reset",
                     ExitCode.ERROR: "host-error"}


class Runner:
    def __init__(self, cfg: MachineConfig, log: Callable[[str], None] | None = None,
                 grace_s: float = SIGTERM_GRACE_S, control_socket: Path | None = None,
                 on_started: Callable[[], None] | None = None,
                 restore: Path | None = None) -> None:
        self.cfg = cfg
        self.restore = restore          # a snapshot the first boot starts from
        self.restore_refused: list[str] = []
        self.control_socket = control_socket
        self.on_started = on_started
        self.qmp = None                 # the QmpServer while the run has one
        self.paused = False
        self.started = False
        self.ended = False
        self._shutdown_reason: str | None = None   # a host-side ending's SHUTDOWN reason
        self._reset_reason: str | None = None
        self.serial: dict[str, Backend] = {}
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
                backends[name].on_quit = lambda: self.quit(
                    ExitCode.POWER_OFF, "quit from the console (C-a x)", "host-ui")
        except BaseException:
            for b in backends.values():
                b.close()
            raise
        return backends

    def quit(self, code: ExitCode, reason: str, shutdown_reason: str = "host-signal") -> None:
        with self._lock:
            if self._quit is None:
                self._quit = (code, reason)
                self._shutdown_reason = shutdown_reason
            m = self.machine
        if m is not None:
            m.stop(code, reason)

    # -- the control interface (QMP) --------------------------------------------------------
    def emit(self, name: str, data: dict | None = None) -> None:
        if self.qmp is not None:
            self.qmp.emit(name, data)

    def status(self) -> str:
        if self.ended or self._quit is not None:
            return "shutdown"
        if not self.started:
            return "prelaunch"
        return "paused" if self.paused else "running"

    def pause(self) -> None:
        """Park every vCPU (QMP ``stop``); a reboot while paused starts paused."""
        from vmrun.qmp import QmpError

        with self._lock:
            if self.paused:
                return
            self.paused = True
            m = self.machine
        if m is not None and not m.vm.pause():
            if not m.vm.stopping:
                raise QmpError("the vCPUs did not stop within 5 seconds")
        self.emit("STOP")

    def resume(self) -> None:
        with self._lock:
            if not self.paused:
                return
            self.paused = False
            m = self.machine
        if m is not None:
            m.vm.resume()
        self.emit("RESUME")

    def powerdown(self) -> None:
        """The ACPI power button (QMP ``system_powerdown``): the guest decides."""
        from vmrun.qmp import QmpError

        m = self.machine
        if m is None:
            raise QmpError("the VM is not running")
        m.press_power_button()
        self.emit("POWERDOWN")

    def snapshot(self, path: Path) -> dict:
        """Save the running machine to ``path`` (vmrun.snapshot): pause, save, resume if it
        ran. A device that cannot be saved makes it a QmpError naming the device."""
        from vmrun.qmp import QmpError
        from vmrun.snapshot import save

        m = self.machine
        if m is None:
            raise QmpError("the VM is not running")
        was_paused = self.paused
        if not was_paused:
            self.pause()
        try:
            return save(self.cfg, m, path)
        except VmrunError as e:
            raise QmpError(str(e)) from None
        except OSError as e:
            raise QmpError(f"{path}: {e.strerror or e}") from None
        finally:
            if not was_paused:
                self.resume()

    def system_reset(self) -> None:
        """Reset the machine as a guest reset would (``on_reboot`` applies)."""
        from vmrun.qmp import QmpError

        m = self.machine
        if m is None:
            raise QmpError("the VM is not running")
        self._reset_reason = "host-qmp-system-reset"
        m.stop(ExitCode.RESET, "system_reset (QMP)")

    def _on_sigterm(self, signum: int, frame: object) -> None:
        m = self.machine
        if m is None or self._quit is not None or self.paused:
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
            serial = self.serial = self._open_serial()
        except BaseException:
            self.host.close()
            raise
        if self.control_socket is not None:
            try:
                self._start_qmp()
            except BaseException:
                for b in serial.values():
                    b.close()
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
                    machine.vm.paused = self.paused    # stopped before a reboot: stays so
                self.boots += 1
                try:
                    if pending is not None:
                        machine.stop(*pending)
                    if self.restore is not None and self.boots == 1:
                        from vmrun.snapshot import restore

                        self.restore_refused = restore(self.cfg, machine, self.restore)
                        for what in self.restore_refused:
                            self.log(f"restore: this host's KVM refused {what}")
                        self.log(f"restored from {self.restore}")
                    machine.start()
                    if not self.started:
                        self.started = True
                        if self.on_started is not None:
                            self.on_started()
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
                    self._end(self._shutdown_reason or "host-signal", guest=False)
                    return ExitInfo(*self._quit)
                reset_reason, self._reset_reason = self._reset_reason, None
                if info.code == ExitCode.RESET and self.cfg.on_reboot == "restart":
                    self.log("guest reset: booting again")
                    self.emit("RESET", {"guest": reset_reason is None,
                                        "reason": reset_reason or "guest-reset"})
                    continue
                self._end(reset_reason or _SHUTDOWN_REASONS.get(info.code, "host-error"),
                          guest=reset_reason is None and info.code != ExitCode.ERROR)
                return info
        finally:
            self.ended = True
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if self.qmp is not None:
                self.qmp.close()
            for b in serial.values():
                b.close()
            self.host.close()

    def _end(self, reason: str, guest: bool) -> None:
        self.ended = True
        self.emit("SHUTDOWN", {"guest": guest, "reason": reason})

    def _start_qmp(self) -> None:
        from vmrun.plugins import get_registry
        from vmrun.qmp import version_info
        from vmrun.qmp.server import QmpServer

        assert self.control_socket is not None
        server = QmpServer(self.control_socket, self.host.loop, get_registry().qmp_commands,
                           self, version_info())
        server.start()
        self.qmp = server
