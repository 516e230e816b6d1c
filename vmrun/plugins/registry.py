"""Device types, their declared options, and option validation for ``[devices.ID]`` tables.

A plugin declares its options once; the core checks the user's table against them and reports
every problem as ``FILE: devices.ID.key: what is wrong (got VALUE)`` before anything starts.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmrun.units import check_path_text, parse_size

if TYPE_CHECKING:
    from vmrun.core.eventloop import EventLoop
    from vmrun.core.host import HostContext
    from vmrun.core.input import InputHub
    from vmrun.core.pci import PciDevice

OPTION_TYPES = ("str", "bool", "int", "size", "path", "choice", "tables", "list")


@dataclass(frozen=True)
class Option:
    """One option of a device emulation.

    ``type``: "str", "bool", "int" (``min``/``max``), "size" (bytes: 512, "20G"), "path"
    (relative to the machine file; ``must_exist``), "choice" (``choices``), "tables" (an
    array of inline tables, each checked against ``fields``, at most ``max`` of them, at least
    ``min``; a problem is reported on ``NAME[i].FIELD``), "list" (a list of distinct strings,
    e.g. port forwards, each one of ``choices`` when given, at most ``max`` of them).
    ``validate`` may further check the parsed value and raise ValueError with the reason.
    """

    name: str
    type: str
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    min: int | None = None
    max: int | None = None
    must_exist: bool = False
    validate: Callable[[Any], None] | None = None
    fields: tuple[Option, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name}: unknown type {self.type!r}")
        if (self.type == "tables") != bool(self.fields):
            raise ValueError(f"option {self.name}: fields go with type \"tables\" only")


@dataclass
class DeviceContext:
    """What a device factory gets besides its options — not the whole VM.

    ``id``: the ``[devices.ID]`` key; ``machine_name`` and ``uuid``: the machine's identity
    (a MAC address or a disk serial derived from them stays stable); ``loop``: the devices'
    event loop; ``input``: the input hub (sources and sinks of keys and pointer events);
    ``host``: the run's :class:`~vmrun.core.host.HostContext`, for host-side things that
    outlive a guest reboot (``ctx.host.get(key, create)``); ``base_dir``: the machine file's
    folder; ``slot``/``func``: where the device sits on bus 0.
    """

    id: str
    machine_name: str
    uuid: str
    host: HostContext
    base_dir: Path = Path(".")
    slot: int = 0
    func: int = 0
    #: Files the factory created (an image made from ``size=``): pass it to
    #: ``open_disk(created=...)``; if the machine then fails to come up, they are removed.
    created: list[Path] = field(default_factory=list)

    @property
    def loop(self) -> EventLoop:
        return self.host.loop

    @property
    def input(self) -> InputHub:
        return self.host.input

    def host_resource(self, name: str, create: Callable[[], Any]) -> Any:
        """A host-side resource of this device, kept across reboots (keyed by device id)."""
        return self.host.get(f"{self.id}:{name}", create)


@dataclass
class DeviceType:
    """A device emulation a plugin registers."""

    name: str
    summary: str
    factory: Callable[[DeviceContext, dict[str, Any]], PciDevice]
    options: list[Option] = field(default_factory=list)
    fixed_slot: int | None = None       # e.g. hostbridge at 0, lpc at 31
    plugin: str = "?"                   # filled in by the registry: distribution name
    version: str = "?"
    # Option names whose (path) value must be unique among devices: an image can only be used
    # by one device. "NAME.FIELD" names a field of each table of a "tables" option.
    exclusive_paths: tuple[str, ...] = ()
    # Cross-option check, run while the machine file is checked (so by ``vmrun check`` too):
    # raises ValueError with the reason; setting ``e.option = "NAME"`` on it puts the error on
    # ``devices.ID.NAME`` (with the value the user wrote) instead of ``devices.ID``.
    check: Callable[[dict[str, Any]], None] | None = None


@dataclass
class PlacedDevice:
    """A validated ``[devices.ID]`` table: ready to instantiate."""

    id: str
    type: DeviceType
    slot: int | None
    func: int
    options: dict[str, Any]


class OptionError(ValueError):
    """(key, message, value): turned into a one-line ConfigError by the config loader."""

    def __init__(self, key: str, message: str, value: Any) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.value = value


def _parse_size(value: Any) -> int:
    """A "size" option: bytes as an int, or a string with a binary K/M/G/T suffix."""
    try:
        return parse_size(value)
    except ValueError:   # the caller adds the value ("got ..."): say what a size looks like
        raise ValueError('must be a size such as 512, "64M" or "20G"') from None


def validate_options(dtype: DeviceType, table: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Check ``table`` (without model/slot) against ``dtype.options``; returns parsed values."""
    out = _parse_table(dtype.options, table, base_dir, f"option for {dtype.name}",
                       f"option of {dtype.name}")
    if dtype.check is not None:
        try:
            dtype.check(out)
        except OptionError:
            raise
        except ValueError as e:   # a check may name the option: e.option = "path"
            key = getattr(e, "option", "")
            raise OptionError(key, str(e), lookup_option(table, key) if key else None) \
                from None
    return out


def lookup_option(table: dict[str, Any], key: str) -> Any:
    """The value the user wrote at ``key`` ("path", or "ports[1].path"), None if absent."""
    value: Any = table
    for part in key.split("."):
        name, _, index = part.partition("[")
        value = value.get(name) if isinstance(value, dict) else None
        if index:
            i = int(index.rstrip("]"))
            value = value[i] if isinstance(value, list) and i < len(value) else None
    return value


def _parse_table(options: list[Option] | tuple[Option, ...], table: dict[str, Any],
                 base_dir: Path, unknown: str, missing: str) -> dict[str, Any]:
    known = {o.name: o for o in options}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            names = ", ".join(sorted(known)) or "none"
            raise OptionError(key, f"unknown {unknown} (its options: {names})", value)
    for opt in options:
        if opt.name not in table:
            if opt.required:
                raise OptionError(opt.name, f"required {missing} is missing", None)
            out[opt.name] = list(opt.default) if opt.type == "list" else opt.default
            continue
        out[opt.name] = _parse_value(opt, table[opt.name], base_dir)
    return out


def _parse_tables(opt: Option, value: Any, base_dir: Path) -> list[dict[str, Any]]:
    """A "tables" option: an array of inline tables, each one checked against the fields."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise OptionError(opt.name, "must be an array of inline tables, e.g. [{...}, {...}]",
                          value)
    if opt.min is not None and len(value) < opt.min or opt.max is not None and \
            len(value) > opt.max:
        raise OptionError(opt.name, f"must have between {opt.min} and {opt.max} entries",
                          value)
    out = []
    for i, item in enumerate(value):
        try:
            out.append(_parse_table(opt.fields, item, base_dir, f"key in {opt.name}",
                                    f"key of {opt.name}"))
        except OptionError as e:
            raise OptionError(f"{opt.name}[{i}].{e.key}" if e.key else f"{opt.name}[{i}]",
                              e.message, e.value) from None
    return out


#: Folders that path options may name by prefix while one machine file is read: ``state:``
#: is the machine's own folder (``~/.local/share/vmrun/machines/NAME``), set by the config
#: loader. ``image:NAME/FILE`` (a built or pulled image in the cache) works everywhere.
PATH_ROOTS: contextvars.ContextVar[dict[str, Path] | None] = contextvars.ContextVar(
    "path_roots", default=None)
_PREFIXED = re.compile(r"(image|state):(.*)", re.S)


def resolve_option_path(value: str, base_dir: Path) -> Path:
    """A path option's value as a path: ``~`` expanded, relative to the machine file's folder,
    or ``image:NAME/FILE`` / ``state:FILE`` (ValueError says what is wrong)."""
    check_path_text(value)
    m = _PREFIXED.fullmatch(value)
    if m:
        rest = m.group(2)
        if not rest or rest.startswith("/") or ".." in rest.split("/"):
            raise ValueError(f"must be {m.group(1)}:NAME/FILE inside that folder")
        if m.group(1) == "image":
            from vmrun.image import resolve_image_path

            return resolve_image_path(value)
        root = (PATH_ROOTS.get() or {}).get("state")
        if root is None:
            raise ValueError("state: paths are for machine files (the machine's own folder)")
        return root / rest
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _parse_value(opt: Option, value: Any, base_dir: Path) -> Any:
    t = opt.type
    if t == "tables":
        parsed = _parse_tables(opt, value, base_dir)
        if opt.validate is not None:
            try:
                opt.validate(parsed)
            except OptionError:
                raise
            except ValueError as e:
                raise OptionError(opt.name, str(e), value) from None
        return parsed
    try:
        if t == "bool":
            if not isinstance(value, bool):
                raise ValueError("must be true or false")
            parsed: Any = value
        elif t == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("must be an integer")
            if opt.min is not None and value < opt.min or opt.max is not None and \
                    value > opt.max:
                raise ValueError(f"must be between {opt.min} and {opt.max}")
            parsed = value
        elif t == "size":
            if isinstance(value, bool):
                raise ValueError("must be a size such as 512, \"64M\" or \"20G\"")
            parsed = _parse_size(value)
            if opt.min is not None and parsed < opt.min:
                raise ValueError(f"must be at least {opt.min}")
        elif t == "choice":
            if value not in opt.choices:
                raise ValueError(f"must be one of {', '.join(opt.choices)}")
            parsed = value
        elif t == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("must be a list of strings")
            for v in value:
                if opt.choices and v not in opt.choices:
                    raise ValueError(f"{v!r} is not one of {', '.join(opt.choices)}")
            if len(set(value)) != len(value):
                raise ValueError("names an entry twice")
            if opt.max is not None and len(value) > opt.max:
                raise ValueError(f"must have at most {opt.max} entries")
            parsed = list(value)
        elif t == "path":
            if not isinstance(value, str) or not value:
                raise ValueError("must be a non-empty path string")
            p = resolve_option_path(value, base_dir)
            if opt.must_exist and not p.exists():
                raise ValueError("file does not exist")
            parsed = p
        else:
            if not isinstance(value, str):
                raise ValueError("must be a string")
            parsed = value
        if opt.validate is not None:
            opt.validate(parsed)
    except ValueError as e:
        raise OptionError(opt.name, str(e), value) from None
    return parsed
