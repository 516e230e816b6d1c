"""From ``[devices.ID]`` tables to placed devices: model lookup, options, slots, conflicts.

Runs while the machine file is validated, before anything is created, so every problem is a
one-line ``FILE: devices.ID.key: ...`` error. ``hostbridge`` (slot 0) and ``lpc`` (slot 31) are
added unless the file names a device of that model (or ``amd_hostbridge``); other devices
without a slot get the lowest free one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmrun.errors import ConfigError, VmrunError
from vmrun.plugins import get_registry
from vmrun.plugins.registry import OptionError, PlacedDevice, validate_options
from vmrun.units import parse_slot

DEFAULT_DEVICES = (("hostbridge", "hostbridge", 0), ("lpc", "lpc", 31))
HOSTBRIDGE_MODELS = ("hostbridge", "amd_hostbridge")


def _error(file: Path, key: str, message: str, value: Any = None) -> ConfigError:
    got = "" if value is None else f" (got {value!r})"
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


def check_devices(file: Path, devices: dict[str, PlacedDevice]) -> None:
    """Cross-device checks: one image per device."""
    seen: dict[Path, str] = {}
    for dev_id, placed in devices.items():
        for opt in placed.type.exclusive_paths:
            p = placed.options.get(opt)
            if p is None:
                continue
            real = Path(p).resolve()
            if real in seen:
                raise _error(file, f"devices.{dev_id}.{opt}", f"image is already used by "
                             f"devices.{seen[real]}", str(p))
            seen[real] = dev_id


def place_devices(cfg) -> list[PlacedDevice]:
    """Every device of the machine with a slot: defaults first, then the file's, in order."""
    reg = get_registry()
    placed: list[PlacedDevice] = []
    devices: dict[str, Any] = cfg.devices
    models = {d.type.name for d in devices.values()}
    for dev_id, model, slot in DEFAULT_DEVICES:
        if model == "hostbridge" and models & set(HOSTBRIDGE_MODELS):
            continue
        if model in models or dev_id in devices:
            continue
        dtype = reg.get(model)
        if dtype is not None:
            placed.append(PlacedDevice(dev_id, dtype, slot, 0, {}))
    placed.extend(devices.values())
    taken = {(d.slot, d.func) for d in placed if d.slot is not None}
    for d in placed:
        if d.slot is None:
            slot = next((s for s in range(1, 31) if (s, 0) not in taken), None)
            if slot is None:
                raise VmrunError(f"{cfg.path}: devices.{d.id}: no free PCI slot left")
            d.slot = slot
            taken.add((slot, d.func))
    return placed
