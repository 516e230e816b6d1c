"""The input hub: where keyboard and pointer events meet, between sources and sinks.

Sources (a VNC server, a test, later a host evdev device) call :meth:`InputHub.key`,
:meth:`InputHub.rel` and :meth:`InputHub.abs`; sinks (the i8042's keyboard and mouse, a USB
tablet) receive them. Events are device-neutral:

- keys are Linux evdev key codes (``KEY_A`` = 30, as in ``linux/input-event-codes.h``): every
  source can map to them and every sink from them, so n sources and m sinks need n + m
  tables, not n × m;
- relative motion is (dx, dy, wheel) with dy positive *down* and wheel positive *up* (away
  from the user, evdev's REL_WHEEL), buttons as a bit mask (1 left, 2 right, 4 middle);
- absolute positions are scaled to 0..:data:`ABS_MAX` on both axes, whatever the screen size.

The hub lives as long as a ``vmrun up`` (host side); each boot's devices attach as sinks and
detach when that boot ends, so a VNC client stays connected across guest reboots. A sink
that cannot take absolute positions (the PS/2 mouse) is skipped for them, and a key goes to
the most recently attached keyboard sink. A sink may say whether the guest listens to it now
(``input_active``, e.g. a USB keyboard the guest has not configured yet answers False): the
newest *active* sink of a kind wins, else the newest one, so keys reach the PS/2 keyboard
until the guest's USB HID driver takes over.
"""

from __future__ import annotations

import threading
from typing import Protocol

ABS_MAX = 0x7FFF
BUTTON_LEFT, BUTTON_RIGHT, BUTTON_MIDDLE = 1, 2, 4


class KeyboardSink(Protocol):
    def input_key(self, code: int, down: bool) -> None: ...


class PointerSink(Protocol):
    def input_rel(self, dx: int, dy: int, wheel: int, buttons: int) -> None: ...


class TabletSink(Protocol):
    def input_abs(self, x: int, y: int, wheel: int, buttons: int) -> None: ...


class InputHub:
    """Fan-in of input sources, routing to the attached sinks (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keyboards: list[KeyboardSink] = []
        self._pointers: list[PointerSink] = []
        self._tablets: list[TabletSink] = []
        self.events = 0

    def attach(self, sink: object) -> None:
        """Attach a sink: whichever of ``input_key``/``input_rel``/``input_abs`` it has."""
        with self._lock:
            if hasattr(sink, "input_key"):
                self._keyboards.append(sink)  # type: ignore[arg-type]
            if hasattr(sink, "input_rel"):
                self._pointers.append(sink)  # type: ignore[arg-type]
            if hasattr(sink, "input_abs"):
                self._tablets.append(sink)  # type: ignore[arg-type]

    def detach(self, sink: object) -> None:
        with self._lock:
            for group in (self._keyboards, self._pointers, self._tablets):
                while sink in group:
                    group.remove(sink)  # type: ignore[arg-type]

    @property
    def has_tablet(self) -> bool:
        """Whether absolute positions reach the guest (a VNC server tells its clients): a
        tablet is attached and its guest listens (``input_active``, default True)."""
        with self._lock:
            return any(getattr(t, "input_active", True) for t in self._tablets)

    @staticmethod
    def _pick(sinks: list) -> object | None:
        """The newest sink whose guest listens (``input_active``, default True), else the
        newest."""
        for sink in reversed(sinks):
            if getattr(sink, "input_active", True):
                return sink
        return sinks[-1] if sinks else None

    def key(self, code: int, down: bool) -> None:
        if not 0 < code < 0x300:
            return
        with self._lock:
            sink = self._pick(self._keyboards)
        self.events += 1
        if sink is not None:
            sink.input_key(code, down)  # type: ignore[attr-defined]

    def rel(self, dx: int, dy: int, wheel: int = 0, buttons: int = 0) -> None:
        with self._lock:
            sink = self._pick(self._pointers)
        self.events += 1
        if sink is not None:
            sink.input_rel(dx, dy, wheel, buttons & 7)  # type: ignore[attr-defined]

    def abs(self, x: int, y: int, wheel: int = 0, buttons: int = 0) -> None:
        """An absolute position (0..ABS_MAX each); with no tablet attached, dropped."""
        x = min(max(x, 0), ABS_MAX)
        y = min(max(y, 0), ABS_MAX)
        with self._lock:
            sink = self._pick(self._tablets)
        self.events += 1
        if sink is not None:
            sink.input_abs(x, y, wheel, buttons & 7)  # type: ignore[attr-defined]
