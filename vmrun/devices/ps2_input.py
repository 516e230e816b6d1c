"""The i8042 as an input-hub sink: evdev key codes become PS/2 set-2 scancodes, relative
pointer motion becomes PS/2 mouse packets. Attached for each boot, detached when it ends."""

from __future__ import annotations

import threading
from collections import deque

from vmrun.devices.i8042 import _SET2_TO_SET1, I8042

BACKLOG_KEYS = 512    # keys typed faster than the guest reads them (a VNC client's paste)

# -- evdev key codes -> PS/2 scancode set 2 (what a keyboard sends on the wire) -------------
# evdev codes 1..88 were chosen equal to the set-1 scancodes of the same keys; set 2 comes from
# inverting the 8042's set-2 -> set-1 translation. Extended keys (E0-prefixed) are listed.
_EXTENDED = {
    96: 0x5A,    # KEY_KPENTER
    97: 0x14,    # KEY_RIGHTCTRL
    98: 0x4A,    # KEY_KPSLASH
    100: 0x11,   # KEY_RIGHTALT
    102: 0x6C,   # KEY_HOME
    103: 0x75,   # KEY_UP
    104: 0x7D,   # KEY_PAGEUP
    105: 0x6B,   # KEY_LEFT
    106: 0x74,   # KEY_RIGHT
    107: 0x69,   # KEY_END
    108: 0x72,   # KEY_DOWN
    109: 0x7A,   # KEY_PAGEDOWN
    110: 0x70,   # KEY_INSERT
    111: 0x71,   # KEY_DELETE
    125: 0x1F,   # KEY_LEFTMETA
    126: 0x27,   # KEY_RIGHTMETA
    127: 0x2F,   # KEY_COMPOSE (menu)
}


def _set1_to_set2() -> dict[int, int]:
    table: dict[int, int] = {}
    for set2, set1 in sorted(_SET2_TO_SET1.items()):
        table.setdefault(set1, set2)
    return table


_SET1_TO_SET2 = _set1_to_set2()


def evdev_to_set2(code: int, down: bool) -> bytes:
    """The set-2 bytes a PS/2 keyboard sends for evdev key ``code`` (b"" if it has none)."""
    if code in _EXTENDED:
        s = _EXTENDED[code]
        return bytes([0xE0, s] if down else [0xE0, 0xF0, s])
    if 1 <= code <= 88:
        s2 = _SET1_TO_SET2.get(code)
        if s2 is None:
            return b""
        return bytes([s2] if down else [0xF0, s2])
    return b""


class Ps2InputSink:
    """Feeds an :class:`I8042`'s keyboard and mouse from the input hub.

    A keyboard buffers 16 bytes; a source can type faster than a slow guest reads (a VNC
    client sends a whole string at once). Keys that do not fit wait here, in order, and move
    into the keyboard as the guest reads the data port; a keyboard that is not scanning drops
    them, as a real one would.
    """

    def __init__(self, i8042: I8042) -> None:
        self.i8042 = i8042
        self._backlog: deque[bytes] = deque()
        self._lock = threading.Lock()
        self.dropped = 0
        i8042.on_data_read = self._drain

    def input_key(self, code: int, down: bool) -> None:
        data = evdev_to_set2(code, down)
        if not data:
            return
        with self._lock:
            if not self._backlog and self.i8042.key_event(data):
                return
            if not self.i8042._kbd_scanning:
                return
            if len(self._backlog) >= BACKLOG_KEYS:
                self.dropped += 1
                return
            self._backlog.append(data)

    def _drain(self) -> None:
        if not self._backlog:
            return
        with self._lock:
            while self._backlog and self.i8042.key_event(self._backlog[0]):
                self._backlog.popleft()
            if self._backlog and not self.i8042._kbd_scanning:
                self._backlog.clear()

    def input_rel(self, dx: int, dy: int, wheel: int, buttons: int) -> None:
        # PS/2 counts y up; the hub counts it down (screen coordinates). mouse_event splits
        # large motions into packets itself.
        self.i8042.mouse_event(dx, -dy, buttons)
