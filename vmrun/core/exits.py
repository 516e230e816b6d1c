"""How a VM ends: bhyve's exit codes, and the exception a vCPU raises to end the VM."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    RESET = 0          # guest reset (or reboot) and on_reboot = "exit"
    POWER_OFF = 1      # ACPI S5, or power off through the VMM
    HALT = 2           # a vCPU halted with nothing to wake it
    TRIPLE_FAULT = 3   # triple fault, or an instruction the VMM cannot emulate
    ERROR = 4          # bad input or an internal error


class VmExit(Exception):
    """Raised on a vCPU thread to end the VM with ``code``; ``reason`` is one line for the user,
    possibly followed by detail lines (registers)."""

    def __init__(self, code: ExitCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
