"""The device state contract for snapshots: ``save_state() -> dict`` and
``load_state(dict)``.

A device's guest-visible state is its registers and queues: plain data. The helpers here
save an object's plain-data attributes (ints, floats, bools, strings, None, bytes and
bytearrays, and lists, tuples and deques of those) and put them back with their types, so a
device with ordinary register fields needs only to say which attributes are *not* state
(configuration, host-side counters) or nothing at all. Objects (IRQ lines, callbacks,
locks, backends) are never state and are skipped. Every saved dict carries the device's
``state_version``; a mismatch on restore is an error, not a guess.

The format, for each device: ``{"version": N, "fields": {name: value}}`` where a value is
JSON, or ``{"b64": ...}`` (bytes), ``{"bytearray": ...}``, ``{"deque": [...]}``,
``{"tuple": [...]}``. It is documented in the README's snapshot section. A device whose
state is not its attributes as they are (sets, chains held by head, a frame in a buffer)
builds the fields itself and uses :func:`versioned` / :func:`check_version`.
"""

from __future__ import annotations

import base64
from collections import deque
from typing import Any


class SnapshotUnsupported(Exception):
    """A device that cannot (yet) save its state: the snapshot is refused, naming it."""


_SCALARS = (int, float, bool, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, (*_SCALARS, bytes, bytearray)):
        return True
    if isinstance(value, list | tuple | deque):
        return all(_plain(v) for v in value)
    return False


def encode(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, bytearray):
        return {"bytearray": base64.b64encode(value).decode()}
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, deque):
        return {"deque": [encode(v) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    raise TypeError(f"not plain data: {type(value).__name__}")


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) != 1:
            raise ValueError(f"an encoded value has one key, not {sorted(value)}")
        (kind, inner), = value.items()
        if kind in ("bytearray", "b64") and not isinstance(inner, str):
            raise ValueError(f"{kind}: {type(inner).__name__}, not base64 text")
        if kind in ("deque", "tuple") and not isinstance(inner, list):
            raise ValueError(f"{kind}: {type(inner).__name__}, not a list")
        if kind == "bytearray":
            return bytearray(base64.b64decode(inner, validate=True))
        if kind == "b64":
            return base64.b64decode(inner, validate=True)
        if kind == "deque":
            return deque(decode(v) for v in inner)
        if kind == "tuple":
            return tuple(decode(v) for v in inner)
        raise ValueError(f"unknown encoding {kind!r}")
    return value


def plain_fields(obj: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every plain-data attribute of ``obj`` not in ``exclude``, as it is (not encoded:
    for a part of a device's state, e.g. one of its drives, inside :func:`versioned`)."""
    return {k: v for k, v in vars(obj).items() if k not in exclude and _plain(v)}


def save_fields(obj: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every plain-data attribute of ``obj`` not in ``exclude``, encoded."""
    return {k: encode(v) for k, v in plain_fields(obj, exclude).items()}


def load_fields(obj: Any, fields: dict[str, Any]) -> None:
    """Put saved attributes back; an attribute the object does not have (another version
    of the device) is an error."""
    current = vars(obj)
    for k, v in fields.items():
        if k not in current:
            raise ValueError(f"{type(obj).__name__} has no attribute {k!r}")
        value = decode(v)
        old = current[k]
        check_type(f"{type(obj).__name__}.{k}", old, value)
        if isinstance(old, bytearray):
            old[:] = value          # keep the object: views and aliases stay valid
        else:
            setattr(obj, k, value)


def check_type(name: str, old: Any, value: Any) -> None:
    """A snapshot file is input: a saved field must be of the type the device holds there
    (an int register stays an int, a register file keeps its length), so that a damaged or
    hand-edited file is one error at restore, not a crash of the running VMM later. None
    stands for "not set" on either side (optional fields)."""
    if old is None or value is None:
        return
    if type(old) is not type(value) and not (isinstance(old, float) and type(value) is int):
        raise ValueError(f"{name}: saved as {type(value).__name__}, the device holds "
                         f"{type(old).__name__}")
    if isinstance(old, bytearray) and len(old) != len(value):
        raise ValueError(f"{name}: {len(value)} bytes saved, the device holds {len(old)}")
    if isinstance(old, list | tuple | deque) and old:
        if len(old) == len(value):          # a register file: each entry keeps its type
            for i, (o, v) in enumerate(zip(old, value, strict=True)):
                check_type(f"{name}[{i}]", o, v)
        elif all(type(o) is type(old[0]) for o in old):     # a queue of one kind of entry
            for i, v in enumerate(value):
                check_type(f"{name}[{i}]", old[0], v)


def check_like(name: str, template: Any, saved: Any) -> None:
    """``saved`` (a device's state from a snapshot file, encoded as saved) has the shape of
    ``template`` (the same device's state as a fresh one saves it): the same keys at every
    level and values of the same types (:func:`check_type`). A device with its own state
    shape is checked this way before it reads a field, so a damaged file is a ValueError
    naming the field, never a crash of the VMM later."""
    if isinstance(template, dict) and not _is_encoded(template):
        if not isinstance(saved, dict) or _is_encoded(saved):
            raise ValueError(f"{name}: saved as {type(saved).__name__}, not a table")
        if set(saved) != set(template):
            missing, extra = set(template) - set(saved), set(saved) - set(template)
            raise ValueError(f"{name}: " + "; ".join(
                ([f"missing {sorted(missing)}"] if missing else []) +
                ([f"unknown {sorted(extra)}"] if extra else [])))
        for k, v in template.items():
            check_like(f"{name}.{k}", v, saved[k])
        return
    if isinstance(template, list) and any(isinstance(t, dict) and not _is_encoded(t)
                                          for t in template):
        if not isinstance(saved, list):     # a list of tables (a transport's queues)
            raise ValueError(f"{name}: saved as {type(saved).__name__}, not a list")
        if len(saved) == len(template):
            for i, (t, v) in enumerate(zip(template, saved, strict=True)):
                check_like(f"{name}[{i}]", t, v)
        else:
            for i, v in enumerate(saved):
                check_like(f"{name}[{i}]", template[0], v)
        return
    check_type(name, decode(template), decode(saved))


def _is_encoded(value: dict) -> bool:
    return len(value) == 1 and next(iter(value)) in ("b64", "bytearray", "deque", "tuple")


def versioned(version: int, fields: dict[str, Any]) -> dict[str, Any]:
    """A device's saved state in the contract's shape: ``fields`` (plain data) encoded."""
    return {"version": version, "fields": {k: encode(v) for k, v in fields.items()}}


def check_version(name: str, state: dict[str, Any], version: int) -> dict[str, Any]:
    """The decoded fields of ``state`` when it is of ``version``; another version (a
    snapshot of another vmrun) is a ValueError naming the device, never a guess."""
    if not isinstance(state, dict) or state.get("version") != version:
        got = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"{name}: state version {got!r}, this vmrun has {version}")
    fields = state.get("fields", {})
    if not isinstance(fields, dict):
        raise ValueError(f"{name}: fields saved as {type(fields).__name__}, not a table")
    return {k: decode(v) for k, v in fields.items()}


class PlainState:
    """``save_state``/``load_state`` from plain-data attributes. A class sets
    ``state_version`` and lists what is not guest state in ``state_exclude``."""

    state_version = 1
    state_exclude: tuple[str, ...] = ()

    def save_state(self) -> dict[str, Any]:
        return {"version": self.state_version,
                "fields": save_fields(self, self.state_exclude)}

    def load_state(self, state: dict[str, Any]) -> None:
        check_version(type(self).__name__, state, self.state_version)
        load_fields(self, state["fields"] if "fields" in state else {})
