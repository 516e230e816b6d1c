"""X keysyms (what RFB key events carry) to Linux evdev key codes, for a US keyboard layout;
and XT scancodes (QEMU's extended key event) to evdev codes, layout-independent.

A keysym names a symbol, not a key: "A" is shift + the A key, "!" is shift + 1. The table
says which key and whether shift is part of the symbol; the server presses a synthetic shift
around such a key when the client did not hold one.
"""

from __future__ import annotations

KEY_LEFTSHIFT = 42

_US_PLAIN = "`1234567890-=qwertyuiop[]\\asdfghjkl;'zxcvbnm,./"
_US_SHIFTED = '~!@#$%^&*()_+QWERTYUIOP{}|ASDFGHJKL:"ZXCVBNM<>?'
_CODES = (41, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
          16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 43,
          30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
          44, 45, 46, 47, 48, 49, 50, 51, 52, 53)

#: keysym -> (evdev code, shift is part of the symbol)
KEYSYMS: dict[int, tuple[int, bool]] = {}
for _ch, _code in zip(_US_PLAIN, _CODES, strict=True):
    KEYSYMS[ord(_ch)] = (_code, False)
for _ch, _code in zip(_US_SHIFTED, _CODES, strict=True):
    KEYSYMS[ord(_ch)] = (_code, True)
KEYSYMS[0x20] = (57, False)                          # space
_SPECIAL = {
    0xFF08: 14, 0xFF09: 15, 0xFF0D: 28, 0xFF1B: 1, 0xFFFF: 111,    # BackSpace Tab Return Esc Del
    0xFF50: 102, 0xFF51: 105, 0xFF52: 103, 0xFF53: 106, 0xFF54: 108,  # Home Left Up Right Down
    0xFF55: 104, 0xFF56: 109, 0xFF57: 107, 0xFF63: 110,             # PgUp PgDn End Insert
    0xFFE1: 42, 0xFFE2: 54, 0xFFE3: 29, 0xFFE4: 97,                 # Shift L/R, Control L/R
    0xFFE9: 56, 0xFFEA: 100, 0xFFE7: 125, 0xFFE8: 126,              # Alt L/R, Meta L/R
    0xFFEB: 125, 0xFFEC: 126, 0xFF67: 127, 0xFE03: 100,             # Super L/R, Menu, AltGr
    0xFFE5: 58, 0xFF7F: 69, 0xFF14: 70, 0xFF61: 99, 0xFF13: 119,    # Caps Num Scroll Print Pause
    0xFF8D: 96, 0xFFAA: 55, 0xFFAB: 78, 0xFFAD: 74, 0xFFAE: 83, 0xFFAF: 98,  # keypad
    0xFF9C: 79, 0xFF99: 80, 0xFF9B: 81, 0xFF96: 75, 0xFF9D: 76, 0xFF98: 77,
    0xFF95: 71, 0xFF97: 72, 0xFF9A: 73, 0xFF9E: 82, 0xFF9F: 83,
}
for _sym, _code in _SPECIAL.items():
    KEYSYMS[_sym] = (_code, False)
for _i in range(10):                                 # KP_0..KP_9
    KEYSYMS[0xFFB0 + _i] = ((82, 79, 80, 81, 75, 76, 77, 71, 72, 73)[_i], False)
for _i in range(12):                                 # F1..F12
    KEYSYMS[0xFFBE + _i] = ((59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 87, 88)[_i], False)
SHIFT_KEYSYMS = (0xFFE1, 0xFFE2)


def keysym_to_evdev(keysym: int) -> tuple[int, bool] | None:
    """(evdev code, needs shift) for ``keysym``, or None for a symbol a US keyboard lacks.
    Latin-1 letters outside ASCII and Unicode keysyms (0x01000000 + code point) of ASCII
    characters map like their ASCII counterparts."""
    if 0x01000020 <= keysym <= 0x0100007E:
        keysym -= 0x01000000
    return KEYSYMS.get(keysym)


# XT (set 1) extended scancodes, as QEMU's extended key event carries them (0xE0 xx as 0x80|xx).
_XT_EXTENDED = {0x1C: 96, 0x1D: 97, 0x35: 98, 0x37: 99, 0x38: 100, 0x47: 102, 0x48: 103,
                0x49: 104, 0x4B: 105, 0x4D: 106, 0x4F: 107, 0x50: 108, 0x51: 109, 0x52: 110,
                0x53: 111, 0x5B: 125, 0x5C: 126, 0x5D: 127}


def xt_to_evdev(keycode: int) -> int | None:
    """The evdev code of an XT scancode (QEMU extended key event); None if unknown."""
    if keycode & 0x80 or keycode & 0xE000 == 0xE000:
        return _XT_EXTENDED.get(keycode & 0x7F)
    if 1 <= keycode <= 88:
        return keycode                     # evdev codes 1..88 are the set-1 scancodes
    return None
