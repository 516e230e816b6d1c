"""Interrupt lines: what a device holds to signal its interrupt controller.

A device never knows KVM. It gets an object with ``set_level(bool)`` (its INTR pin, as in
vm-superio's ``Trigger``), calls it whenever its output changes, and the line forwards the
change to the in-kernel PIC/IOAPIC (``KVM_IRQ_LINE``) or, in tests, records it.
Edge-triggered ISA inputs latch the rising edge, so devices model the pin level honestly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class IrqLine(Protocol):
    def set_level(self, level: bool) -> None: ...


class CallbackIrqLine:
    """An IRQ line that calls ``fn(gsi, level)`` when its level changes."""

    __slots__ = ("gsi", "level", "_fn", "raised")

    def __init__(self, gsi: int, fn: Callable[[int, int], None]) -> None:
        self.gsi = gsi
        self.level = False
        self._fn = fn
        self.raised = 0     # rising edges: how often the device interrupted

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            self.raised += level
            self._fn(self.gsi, int(level))

    def pulse(self) -> None:
        """A rising then falling edge (for edge-triggered event sources)."""
        self.set_level(True)
        self.set_level(False)


class RecordingIrqLine:
    """For tests: remembers every level change."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            self.changes.append(level)

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)

    @property
    def raised_count(self) -> int:
        return sum(1 for c in self.changes if c)
