"""Sizes and PCI slot numbers as machine files and the command line write them, values as
TOML writes them, and the file-system rules for the paths a machine file names.

A leaf module: it imports nothing from vmrun (not even :mod:`vmrun.errors`), so the config
loader, the plugin registry, the block layer and the CLI all share these rules without import
cycles. The parsers and path checks raise ValueError; callers turn that into their own
one-line error.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZE_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
MAX_SLOT, MAX_FUNC = 31, 7

# "512", "512M", "2G", "2GiB", "2gb", "3 MB", "1B"; ASCII digits only, one optional unit.
_SIZE_RE = re.compile(r"(\d+) *(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE | re.ASCII)
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
    m = _SIZE_RE.fullmatch(text.strip(" "))
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


# -- values as TOML writes them --------------------------------------------------------------
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def format_value(value: Any, limit: int = 60) -> str:
    """``value`` as it would be written in TOML, on one line, cut to about ``limit`` chars."""
    try:
        text = _toml(value)
    except RecursionError:   # nested deeper than we care to write out
        text = "[...]" if isinstance(value, list) else "{...}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)   # JSON string escapes are valid TOML
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key_part(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Path):
        return _toml(str(value))
    return repr(value)


def key_part(key: str) -> str:
    """A key as TOML spells it in a dotted path: bare when it can be, quoted otherwise."""
    return key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)


# -- paths ------------------------------------------------------------------------------------
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """The kind of a non-regular file ("a directory", "a FIFO", ...) from its ``st_mode``."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_path_text(text: str) -> None:
    """A path string must not hold a NUL (no system call can take it)."""
    if "\0" in text:
        raise ValueError("a path must not contain a NUL character")


def check_input_file(p: Path, what: str, *, empty_ok: bool = True) -> os.stat_result:
    """``p`` must be an existing, readable regular file (not a FIFO, socket, device or
    directory: reading one could block or never end). Opened with O_NONBLOCK, so a FIFO
    cannot hang the check. Returns its ``stat``."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ValueError(f"{what} {p} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} {p}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what} {p} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {p} is {file_kind(st.st_mode)}, not a regular file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what} {p} is not readable")
    try:
        os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as e:
        raise ValueError(f"{what} {p} is not readable ({e.strerror})") from None
    if not empty_ok and st.st_size == 0:
        raise ValueError(f"{what} {p} is empty (0 bytes)")
    return st


def check_output_file(p: Path) -> None:
    """Where a ``file`` backend writes: a regular file (new or existing) or a character
    device such as /dev/null or a tty, in an existing directory we may write to. A directory,
    a FIFO (opening it would wait for a reader), a socket or a block device is refused."""
    if not p.parent.is_dir():
        raise ValueError(f"directory {p.parent} does not exist")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ValueError(f"{p}: {e.strerror}") from None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        raise ValueError(f"{p} is {file_kind(st.st_mode)}")
    if not os.access(p if st is not None else p.parent, os.W_OK):
        raise ValueError(f"{p} is not writable")


def file_identity(p: Path) -> tuple[int, int] | Path:
    """What makes two paths one file: ``(st_dev, st_ino)`` when it exists (so hard links and
    symlinks match), else the resolved path."""
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return p.resolve()
    return st.st_dev, st.st_ino
