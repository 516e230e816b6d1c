"""Debug ports for tests and boot measurement: exit with a code, boot markers, debug console.

These are host-side hooks, not emulated hardware, so they are as small as a bus device can be;
each reads as all ones except the debug console, which reads 0xE9 like bochs and QEMU so a
guest can detect it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEBUGCON_READBACK = 0xE9


class DebugExit:
    """Port 0xF4: a write of value V ends the VM through ``on_exit(V)``."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._on_exit(value & ((1 << (8 * size)) - 1))


class BootMarker:
    """Port 0xF5: each byte written is a boot milestone, reported with ``clock()`` at arrival.

    A wider write is that many milestones, lowest byte first (as separate byte writes would be).
    """

    def __init__(self, on_marker: Callable[[int, float], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._on_marker = on_marker
        self._clock = clock

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return
        now = self._clock()
        for i in range(size):
            self._on_marker((value >> (8 * i)) & 0xFF, now)


class DebugCon:
    """Port 0xE9 (bochs/QEMU debugcon): bytes written go to ``out`` unbuffered."""

    def __init__(self, out: Callable[[bytes], None]) -> None:
        self._out = out

    def read(self, offset: int, size: int) -> int:
        return DEBUGCON_READBACK

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._out((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
