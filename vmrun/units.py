"""Sizes and PCI slot numbers as machine files and the command line write them.

A leaf module: it imports nothing from vmrun (not even :mod:`vmrun.errors`), so the config
loader, the plugin registry, the block layer and the CLI all share these rules without import
cycles. Both parsers raise ValueError; callers turn that into their own one-line error.
"""

from __future__ import annotations

import re
from typing import Any

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZE_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
MAX_SLOT, MAX_FUNC = 31, 7

# "512", "512M", "2G", "2GiB", "2gb", "3 MB", "1B"; ASCII digits only, one optional unit.
_SIZE_RE = re.compile(r"(\d+)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE | re.ASCII)
_SLOT_RE = re.compile(r"(\d{1,3})(?::(\d{1,3}))?", re.ASCII)


def parse_size(text: str | int) -> int:
    """``"512M"``, ``"2G"``, ``"64K"``, ``"1T"`` (also ``"2GiB"``, ``"2gb"``, ``" 3 MB "``),
    ``"4096"`` or a non-negative int -> bytes. Units are powers of 1024.

    Raises ValueError naming the bad text and saying what a size looks like; bools, floats,
    negative numbers, fractions, hex and unknown units are all refused.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"size {text!r} is not a whole number of bytes or a string such as "
                         '"512M" or "2G"')
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} must not be negative")
        return text
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K, M, G or T suffix "
                         '(binary units, such as "512M" or "2G")')
    return int(m.group(1)) * SIZE_UNITS[(m.group(2) or "").upper()]


def parse_slot(value: Any) -> tuple[int, int]:
    """A PCI slot as a machine file writes it -> ``(slot, function)``.

    ``3`` or ``"3"`` is slot 3 function 0; ``"3:1"`` is slot 3 function 1. Slots are 0-31,
    functions 0-7. Raises ValueError with the reason (the caller adds the key and the value).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        slot, func = value, 0
    elif isinstance(value, str) and (m := _SLOT_RE.fullmatch(value)):
        slot, func = int(m.group(1)), int(m.group(2) or 0)
    else:
        raise ValueError('must be a slot number or "slot:function"')
    if not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"slot must be between 0 and {MAX_SLOT}")
    if not 0 <= func <= MAX_FUNC:
        raise ValueError(f"function must be between 0 and {MAX_FUNC}")
    return slot, func
