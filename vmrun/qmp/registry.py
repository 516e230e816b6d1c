"""QMP commands as plugins register them (the ``vmrun_qmp_commands`` hook).

A command is a name, a handler and its arguments, declared the way QAPI schemas write them:
``{"device": "str", "*force": "bool"}`` (a ``*`` marks an optional argument; types ``str``,
``int``, ``number``, ``bool``, ``object``, ``array``, ``any``). The server checks the
arguments before the handler runs, so a handler gets exactly what it declared, as keyword
arguments, after the :class:`QmpContext`::

    from vmrun.api import QmpCommand, QmpError, hookimpl

    def _eject(ctx, device, force=False):
        dev = ctx.device(device)            # the [devices.ID] it names, else a QmpError
        dev.eject(force)                    # return None for {"return": {}}

    @hookimpl
    def vmrun_qmp_commands(register):
        register(QmpCommand("eject", _eject, {"device": "str", "*force": "bool"},
                            "eject the medium of a removable drive"))

Handlers run on the control thread (one for the whole VM, commands in order), never on a
vCPU or on the devices' event loop, so they may take a moment (a screendump); anything that
touches device state the loop also touches goes through ``ctx.loop.call_soon`` or the
device's own lock. A handler raises :class:`QmpError` for the client's mistakes; any other
exception becomes a GenericError ("internal error: ...") and is logged; the VM goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmrun.qmp.protocol import QmpError

if TYPE_CHECKING:
    from vmrun.core.eventloop import EventLoop

ARG_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "number": (int, float), "bool": (bool,),
    "object": (dict,), "array": (list,), "any": (object,),
}
_TYPE_WORDS = {"str": "string", "int": "integer", "number": "number", "bool": "boolean",
               "object": "object", "array": "array", "any": "any"}


@dataclass
class QmpCommand:
    name: str
    handler: Callable[..., Any]
    args: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    plugin: str = ""           # filled in by the registry

    def __post_init__(self) -> None:
        for key, typ in self.args.items():
            if typ not in ARG_TYPES:
                raise ValueError(f"QMP command {self.name}: argument {key!r} has unknown "
                                 f"type {typ!r} (known: {', '.join(ARG_TYPES)})")

    def check_args(self, given: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments for the handler, or a QmpError as QEMU words it."""
        declared = {k.lstrip("*"): (t, not k.startswith("*")) for k, t in self.args.items()}
        for key in given:
            if key not in declared:
                raise QmpError(f"Parameter '{key[:80]}' is unexpected")
        out: dict[str, Any] = {}
        for key, (typ, required) in declared.items():
            if key not in given:
                if required:
                    raise QmpError(f"Parameter '{key}' is missing")
                continue
            value = given[key]
            ok = isinstance(value, ARG_TYPES[typ])
            if typ in ("int", "number") and isinstance(value, bool):
                ok = False
            if not ok:
                raise QmpError(f"Invalid parameter type for '{key}', expected: "
                               f"{_TYPE_WORDS[typ]}")
            out[key.replace("-", "_")] = value
        return out


class QmpContext:
    """What a command handler gets: the VM it controls (``control``: the runner), the
    devices' event loop, events, and the devices of the current boot by their id."""

    def __init__(self, control: Any, emit: Callable[[str, dict | None], None],
                 loop: EventLoop | None = None,
                 commands: dict[str, QmpCommand] | None = None) -> None:
        self.control = control
        self.emit = emit
        self.loop = loop
        self.commands = commands or {}      # every command this server offers
        self._after: list[Callable[[], None]] = []

    @property
    def machine(self) -> Any:
        """The current boot's :class:`vmrun.machine.Machine` (None between boots)."""
        return getattr(self.control, "machine", None)

    def device(self, dev_id: str) -> Any:
        """The device of ``[devices.ID]`` (for a virtio device: its transport; the device
        model is ``.device``), or a QmpError (DeviceNotFound) naming the id."""
        m = self.machine
        if m is not None:
            for placed, dev in zip(getattr(m, "placed", ()), getattr(m, "devices", ()),
                                   strict=False):
                if placed.id == dev_id:
                    return dev
        raise QmpError(f"Device '{dev_id[:80]}' not found", "DeviceNotFound")

    def after_reply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once this command's reply is on its way (``quit`` ends the VM only
        after its client got the answer)."""
        self._after.append(fn)
