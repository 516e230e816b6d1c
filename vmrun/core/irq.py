"""Interrupt lines: what a device holds to signal its interrupt controller.

A device never knows KVM. It gets an object with ``set_level(bool)`` (its INTR pin, as in
vm-superio's ``Trigger``), calls it whenever its output changes, and the line forwards the
change to the in-kernel PIC/IOAPIC (``KVM_IRQ_LINE``, through :class:`IrqLines`, which
wires the lines to GSIs as a board does) or, in tests, records it.
Edge-triggered ISA inputs latch the rising edge, so devices model the pin level honestly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class IrqLine(Protocol):
    def set_level(self, level: bool) -> None: ...


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


class IrqLines:
    """Every interrupt line the machine's devices hold, wired to the in-kernel PIC and
    IOAPIC by GSI as a board wires them.

    Several lines may share a GSI: PCI INTx pins are swizzled over the IOAPIC's inputs 16-23
    and are wired-OR and level-triggered, as on real boards. KVM takes one level per GSI
    from all of userspace (``KVM_IRQ_LINE`` has one source for it), so the lines of a GSI
    are ORed here: were each line to drive KVM itself, one device lowering its pin would
    drop another's pending interrupt.

    Snapshots save each line's level, in the order the lines were made (a machine is built
    from its file in the same order every time). :meth:`restoring` puts them back: a line
    a device held high then really deasserts when the device lowers it (in a fresh VM it
    would be a no-op, and KVM would re-deliver a level interrupt after every EOI), and a
    level-triggered GSI that was high is driven high again, because ``KVM_SET_IRQCHIP``
    restores the IOAPIC's pending bits but not userspace's line level. An edge-triggered
    line that was high is not driven: its edge reached the irqchip before the snapshot and
    is in its restored state; a second edge would be a spurious interrupt.
    """

    def __init__(self, drive: Callable[[int, int], None]) -> None:
        self._drive = drive
        self._lock = threading.Lock()
        self.lines: list[BoardIrqLine] = []
        self._level_triggered: set[int] = set()
        self._high: dict[int, int] = {}      # GSI -> how many of its lines are high
        self._held = False                   # restoring: KVM is not driven

    def line(self, gsi: int, *, level_triggered: bool = False) -> BoardIrqLine:
        """A new line into ``gsi``; ``level_triggered`` for an input the guest's interrupt
        controller is told is level-triggered (PCI INTx, the ACPI SCI)."""
        line = BoardIrqLine(gsi, self)
        with self._lock:
            self.lines.append(line)
            if level_triggered:
                self._level_triggered.add(gsi)
        return line

    def _set(self, line: BoardIrqLine, level: bool) -> None:
        with self._lock:        # the level test too: devices set lines from several threads
            if level == line.level:
                return
            line.level = level
            line.raised += level
            gsi = line.gsi
            before = self._high.get(gsi, 0)
            after = before + (1 if level else -1)
            self._high[gsi] = after
            if not self._held and (before == 0) != (after == 0):
                self._drive(gsi, int(after > 0))

    def save_state(self) -> list[list[int]]:
        """``[[gsi, level], ...]``, one per line in the order the lines were made."""
        with self._lock:
            return [[line.gsi, int(line.level)] for line in self.lines]

    @contextmanager
    def restoring(self, saved: list) -> Iterator[None]:
        """Around a machine's restore: devices loading their state do not drive KVM (the
        irqchip is restored after them); on the way out every line takes its saved level
        and the level-triggered GSIs that were high are driven high."""
        have = [line.gsi for line in self.lines]
        if (not isinstance(saved, list)
                or not all(isinstance(s, list) and len(s) == 2 and type(s[0]) is int
                           and s[1] in (0, 1) and type(s[1]) is int for s in saved)):
            raise ValueError("interrupt lines: saved as something other than [[gsi, level]]")
        if [s[0] for s in saved] != have:
            raise ValueError(f"interrupt lines on GSIs {[s[0] for s in saved]} saved, the "
                             f"machine has {have}")
        with self._lock:
            self._held = True
        try:
            yield
        finally:
            with self._lock:
                self._held = False
                self._high.clear()
                for line, (_gsi, level) in zip(self.lines, saved, strict=True):
                    line.level = bool(level)
                    if level:
                        self._high[line.gsi] = self._high.get(line.gsi, 0) + 1
                for gsi, n in sorted(self._high.items()):
                    if n and gsi in self._level_triggered:
                        self._drive(gsi, 1)


class BoardIrqLine:
    """One device's pin into a GSI of :class:`IrqLines`."""

    __slots__ = ("gsi", "level", "raised", "_board")

    def __init__(self, gsi: int, board: IrqLines) -> None:
        self.gsi = gsi
        self.level = False
        self.raised = 0     # rising edges: how often the device interrupted
        self._board = board

    def set_level(self, level: bool) -> None:
        self._board._set(self, bool(level))

    def pulse(self) -> None:
        """A rising then falling edge (for edge-triggered event sources)."""
        self.set_level(True)
        self.set_level(False)
