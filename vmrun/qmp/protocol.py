"""QMP's wire format without any I/O: splitting a byte stream into JSON messages, checking a
command message, and building replies, errors and events.

QMP is a stream of JSON objects, not lines: QEMU's own client library (``qemu.qmp``) sends a
command without a newline, and a value may span lines. :class:`JsonSplitter` therefore counts
brackets (outside strings) to find where a value ends, and only then parses it with
:func:`json.loads`. A hostile client is bounded: a value longer than ``max_message`` bytes or
nested deeper than ``max_depth`` is a fatal error (the server answers it and drops the
client); text that is not a JSON value at all is skipped up to the next newline and answered
with one error, as QEMU does, and the session goes on.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 20        # bytes of one incoming JSON value
MAX_DEPTH = 64               # nesting of arrays/objects in one incoming value

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

_WS = re.compile(rb"[ \t\r\n]*")
_SIGNIFICANT = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')


class QmpError(Exception):
    """What a command handler raises to answer ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class FatalInput(Exception):
    """The client sent something the server will not buffer (too long, too deep)."""


@dataclass
class Parsed:
    """One item of the input stream: a JSON value, or the error that replaces a bad one."""

    value: Any = None
    error: str | None = None


class JsonSplitter:
    """Feed bytes, get the complete top-level JSON values (and errors) they finish."""

    def __init__(self, max_message: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self.max_message = max_message
        self.max_depth = max_depth
        self.buf = bytearray()
        self.pos = 0            # scan position in buf
        self.depth = 0          # bracket depth of the value being scanned
        self.in_string = False
        self.garbage = False    # skipping text that is not a JSON value, up to a newline

    def feed(self, data: bytes) -> list[Parsed]:
        """The values ``data`` completes; raises :class:`FatalInput` when the value in
        progress is over the limits (the splitter is then unusable)."""
        buf = self.buf
        buf += data
        out: list[Parsed] = []
        pos = self.pos
        n = len(buf)
        while pos < n:
            if self.garbage:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    pos = n
                    break
                out.append(Parsed(error="JSON parse error: not a JSON object"))
                self.garbage = False
                del buf[:nl + 1]
                pos, n = 0, len(buf)
                continue
            if self.depth == 0:
                pos = _WS.match(buf, pos).end()
                if pos:
                    del buf[:pos]
                    pos, n = 0, len(buf)
                if not n:
                    break
                if buf[0] in b"{[":
                    self.depth, pos = 1, 1
                else:
                    self.garbage = True
                continue
            if self.in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                if buf[m.start()] == 0x5C:          # backslash: skip the escaped byte
                    if m.start() + 1 >= n:
                        pos = m.start()
                        break
                    pos = m.start() + 2
                    continue
                self.in_string = False
                pos = m.end()
                continue
            m = _SIGNIFICANT.search(buf, pos)
            if m is None:
                pos = n
                break
            ch = buf[m.start()]
            pos = m.end()
            if ch == 0x22:                          # "
                self.in_string = True
            elif ch in b"{[":
                self.depth += 1
                if self.depth > self.max_depth:
                    raise FatalInput(f"JSON nested deeper than {self.max_depth} levels")
            else:
                self.depth -= 1
                if self.depth == 0:
                    out.append(_parse(bytes(buf[:pos])))
                    del buf[:pos]
                    pos, n = 0, len(buf)
        self.pos = pos
        if (self.depth or self.garbage) and len(buf) > self.max_message:
            raise FatalInput(f"message longer than {self.max_message} bytes")
        return out


def _parse(raw: bytes) -> Parsed:
    try:
        return Parsed(value=json.loads(raw))
    except (ValueError, RecursionError) as e:      # JSONDecodeError, UnicodeDecodeError, ints
        return Parsed(error=f"JSON parse error: {_short(e)}")


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) <= 200 else text[:200] + "..."


@dataclass
class Command:
    """A checked command message."""

    name: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


def check_command(msg: Any) -> Command:
    """The command ``msg`` asks for, or :class:`QmpError` in QEMU's words."""
    if not isinstance(msg, dict):
        raise QmpError("QMP input must be a JSON object")
    for key in msg:
        if key not in ("execute", "arguments", "id"):
            if key == "exec-oob":
                raise QmpError("QMP input member 'exec-oob' is not supported "
                               "(out-of-band execution is not enabled)")
            raise QmpError(f"QMP input member '{_clip(key)}' is unexpected")
    if "execute" not in msg:
        raise QmpError("QMP input lacks member 'execute'")
    name = msg["execute"]
    if not isinstance(name, str):
        raise QmpError("QMP input member 'execute' must be a string")
    args = msg.get("arguments", {})
    if not isinstance(args, dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    return Command(name, args, msg.get("id"), "id" in msg)


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


def timestamp(now: float | None = None) -> dict[str, int]:
    now = time.time() if now is None else now
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}


def event(name: str, data: dict[str, Any] | None = None, now: float | None = None) -> dict:
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = timestamp(now)
    return msg


def reply(value: Any, cmd: Command | None) -> dict:
    msg: dict[str, Any] = {"return": {} if value is None else value}
    if cmd is not None and cmd.has_id:
        msg["id"] = cmd.id
    return msg


def error_reply(err: QmpError, cmd: Command | None = None, msg_id: Any = None,
                has_id: bool = False) -> dict:
    msg: dict[str, Any] = {"error": {"class": err.error_class, "desc": err.desc}}
    if cmd is not None and cmd.has_id:
        msg["id"] = cmd.id
    elif has_id:
        msg["id"] = msg_id
    return msg


def encode(msg: dict) -> bytes:
    """One message on the wire: compact JSON, then CRLF (QEMU's framing; line readers such as
    qemu.qmp and socat users rely on the line end)."""
    return json.dumps(msg, separators=(", ", ": ")).encode() + b"\r\n"
