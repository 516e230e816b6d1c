"""From ``[devices.ID]`` tables to placed devices: model lookup, options, slots, conflicts.

Runs while the machine file is validated, before anything is created, so every problem is a
one-line ``FILE: devices.ID.key: ...`` error. ``hostbridge`` (slot 0) and ``lpc`` (slot 31) are
added unless the file names a device of that model (or ``amd_hostbridge``); other devices
without a slot get the lowest free one. :func:`check_devices` lays the bus out the way
:func:`place_devices` will, so a clash with those two, a second host bridge or a bus with no
free slot left is refused by ``vmrun check`` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmrun.errors import ConfigError, VmrunError
from vmrun.plugins import get_registry
from vmrun.plugins.registry import OptionError, PlacedDevice, validate_options
from vmrun.units import file_identity, format_value, parse_slot

DEFAULT_DEVICES = (("hostbridge", "hostbridge", 0), ("lpc", "lpc", 31))
HOSTBRIDGE_MODELS = ("hostbridge", "amd_hostbridge")
FREE_SLOTS = range(1, 31)       # 0 is the host bridge's, 31 the LPC bridge's


def _error(file: Path, key: str, message: str, value: Any = None) -> ConfigError:
    got = "" if value is None else f" (got {format_value(value)})"
    return ConfigError(f"{file}: {key}: {message}{got}")


def validate_device(file: Path, prefix: str, dev_id: str, table: dict[str, Any]) -> PlacedDevice:
    """The ``device_validator`` the config loader calls for each ``[devices.ID]`` table.

    ``table`` is the user's table; ``model`` and ``slot`` syntax were checked by the loader.
    """
    reg = get_registry()
    model = table["model"]
    dtype = reg.get(model)
    if dtype is None:
        known = ", ".join(sorted(reg.devices))
        raise _error(file, f"{prefix}.model", f"no device emulation of that name (installed: "
                     f"{known})", model)
    slot: int | None = None
    func = 0
    if table.get("slot") is not None:
        try:
            slot, func = parse_slot(table["slot"])
        except ValueError as e:
            raise _error(file, f"{prefix}.slot", str(e), table["slot"]) from None
    if dtype.fixed_slot is not None and slot is not None and slot != dtype.fixed_slot:
        raise _error(file, f"{prefix}.slot", f"{model} always sits in slot {dtype.fixed_slot}",
                     table.get("slot"))
    if dtype.fixed_slot is not None:
        slot = dtype.fixed_slot
    options = {k: v for k, v in table.items() if k not in ("model", "slot")}
    try:
        parsed = validate_options(dtype, options, file.parent)
    except OptionError as e:
        key = f"{prefix}.{e.key}" if e.key else prefix
        raise _error(file, key, e.message, e.value) from None
    return PlacedDevice(dev_id, dtype, slot, func, parsed)


def check_devices(file: Path, devices: dict[str, PlacedDevice],
                  taken: dict[Any, str] | None = None) -> None:
    """Cross-device checks: one host file per device (an image, a UART's output: the same
    file however it is reached, a hard link or a symlink counts, and not one a serial port
    already writes — ``taken`` maps those to their key paths), and the bus laid out as
    :func:`place_devices` will."""
    seen: dict[Any, str] = dict(taken or {})
    for dev_id, placed in devices.items():
        for key, p in _exclusive_paths(placed):
            ident = file_identity(Path(p))
            if ident in seen:
                raise _error(file, f"devices.{dev_id}.{key}", "this file is already used by "
                             f"{seen[ident]}", str(p))
            seen[ident] = f"devices.{dev_id}" + (f".{key}" if "[" in key else "")
    _layout(file, devices, {d: p.type.name for d, p in devices.items()})


def _exclusive_paths(placed: PlacedDevice) -> list[tuple[str, Any]]:
    """(key, path) of each exclusive path option that is set; "NAME.FIELD" walks the tables of
    a "tables" option (key "NAME[i].FIELD")."""
    out = []
    for opt in placed.type.exclusive_paths:
        name, _, field = opt.partition(".")
        value = placed.options.get(name)
        if field:
            for i, entry in enumerate(value or ()):
                if isinstance(entry, dict) and entry.get(field) is not None:
                    out.append((f"{name}[{i}].{field}", entry[field]))
        elif value is not None:
            out.append((name, value))
    return out


def _defaults(devices: dict[str, Any], models: set[str]) -> list[tuple[str, str, int]]:
    """The default devices (id, model, slot) a machine with ``devices`` gets."""
    out = []
    for dev_id, model, slot in DEFAULT_DEVICES:
        if model == "hostbridge" and models & set(HOSTBRIDGE_MODELS):
            continue
        if model in models or dev_id in devices:
            continue
        out.append((dev_id, model, slot))
    return out


def _layout(file: Path, devices: dict[str, PlacedDevice], models: dict[str, str]) -> None:
    """Refuse what place_devices would trip over: two devices in one slot:function (a fixed
    slot counts, and so do the default host bridge and LPC bridge), two host bridges, more
    devices than free slots."""
    bridges = [d for d, m in models.items() if m in HOSTBRIDGE_MODELS]
    if len(bridges) > 1:
        raise _error(file, f"devices.{bridges[1]}.model", f"a machine has one host bridge "
                     f"(devices.{bridges[0]} is one)", models[bridges[1]])
    taken: dict[tuple[int, int], str] = {}
    for dev_id, model, slot in _defaults(devices, set(models.values())):
        taken[(slot, 0)] = f"the default {model} (devices.{dev_id})"
    for dev_id, placed in devices.items():
        if placed.slot is None:
            continue
        where = (placed.slot, placed.func)
        if where in taken:
            raise _error(file, f"devices.{dev_id}.slot", f"slot {where[0]}:{where[1]} is taken "
                         f"by {taken[where]}",
                         where[0] if where[1] == 0 else f"{where[0]}:{where[1]}")
        taken[where] = f"devices.{dev_id}"
    for dev_id, placed in devices.items():
        if placed.slot is None:
            slot = next((s for s in FREE_SLOTS if (s, 0) not in taken), None)
            if slot is None:
                raise _error(file, f"devices.{dev_id}", f"no free PCI slot left (slots "
                             f"{FREE_SLOTS[0]}-{FREE_SLOTS[-1]} are all taken)")
            taken[(slot, 0)] = f"devices.{dev_id}"


def place_devices(cfg, extra: list[PlacedDevice] | None = None) -> list[PlacedDevice]:
    """Every device of the machine with a slot: defaults first, then the file's, in order,
    then ``extra`` ones vmrun adds itself (the cloud-init seed)."""
    reg = get_registry()
    placed: list[PlacedDevice] = []
    devices: dict[str, Any] = dict(cfg.devices)
    for d in extra or ():
        devices.setdefault(d.id, d)
    models = {d.type.name for d in devices.values()}
    for dev_id, model, slot in _defaults(devices, models):
        dtype = reg.get(model)
        if dtype is not None:
            placed.append(PlacedDevice(dev_id, dtype, slot, 0, {}))
    placed.extend(devices.values())
    taken = {(d.slot, d.func) for d in placed if d.slot is not None}
    for d in placed:
        if d.slot is None:
            slot = next((s for s in FREE_SLOTS if (s, 0) not in taken), None)
            if slot is None:
                raise VmrunError(f"{cfg.path}: devices.{d.id}: no free PCI slot left")
            d.slot = slot
            taken.add((slot, d.func))
    return placed
