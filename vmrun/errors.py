"""The exception types that reach the user as a single red line and exit code 4.

A leaf module: it imports nothing from vmrun, so every layer (the config loader, the plugin
system, the block layer) can raise these without import cycles. :func:`one_line` is the one
place that makes an error message safe to print as a single line.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: object) -> str:
    """``text`` as one printable line: line breaks, carriage returns, tabs, escape sequences and
    every other control, separator or format character (also the surrogates a non-UTF-8 file
    name decodes to) are written out as Python's repr writes them (``\\n``, ``\\x1b``,
    ``\\u2028``, ``\\udcff``); backslashes and ordinary characters stay as they are."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class VmrunError(Exception):
    """A user-facing error: bad input, missing file, a guest image we cannot use.

    The message is one line saying what is wrong and where (file, key path, value). Longer
    material (a build log's tail) goes in ``detail``: the CLI prints it only with ``-v``.
    """

    exit_code = 4

    def __init__(self, *args: object, detail: str = "") -> None:
        super().__init__(*args)
        self.detail = detail


class ConfigError(VmrunError):
    """A problem with a machine file: one line naming the file, the key path and the value.

    Line breaks (and every other control character) are escaped here, whoever builds the
    message, so that a value (or a file name) containing one cannot split the error over
    several lines.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))
