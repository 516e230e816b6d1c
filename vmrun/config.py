"""The TOML machine file: loading and complete validation before anything is created.

Every problem is one line, ``FILE: key.path: what is wrong (got VALUE)``, raised as
:class:`ConfigError` (exit code 4). Paths are relative to the machine file; ``image:NAME/FILE``
names a file of a guest image built by ``vmrun image build`` (see :mod:`vmrun.image`).
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from vmrun.core.cpufeatures import FEATURES
from vmrun.errors import VmrunError

UUID_NAMESPACE = uuidlib.UUID("6f0c5d3e-6a0b-4f4e-9c1e-76d6e2b3a001")
MiB = 1 << 20
SERIAL_PORTS = ("com1", "com2", "com3", "com4")
SERIAL_BACKENDS = ("stdio", "file", "socket", "pty", "null")
TOP_KEYS = {"name", "cpus", "memory", "uuid", "rtc", "on_reboot", "on_unhandled_io", "cpu",
            "boot", "serial", "devices"}


class ConfigError(VmrunError):
    """A problem with a machine file: one line naming the file, the key path and the value."""


@dataclass(frozen=True)
class CpuConfig:
    profile: str = "host"
    features: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class BootConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class SerialConfig:
    backend: str
    path: Path | None = None


@dataclass(frozen=True)
class MachineConfig:
    path: Path
    name: str
    cpus: int
    memory: int
    uuid: uuidlib.UUID
    rtc: str
    on_reboot: str
    on_unhandled_io: str
    cpu: CpuConfig
    boot: BootConfig
    serial: dict[str, SerialConfig]
    devices: dict[str, Any]


def parse_size(value: str | int) -> int:
    """"512M", "2G", "64K", "4096" or an int (bytes) -> bytes."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as \"512M\" or \"2G\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)i?B?\s*", str(value), re.I)
    if not m:
        raise ValueError("must be a size such as \"512M\" or \"2G\"")
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
    return int(m.group(1)) * units[m.group(2).upper()]


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


class _Checker:
    def __init__(self, file: Path) -> None:
        self.file = file

    def error(self, key: str, message: str, value: Any = None, show: bool = True) -> ConfigError:
        got = f" (got {_fmt(value)})" if show else ""
        return ConfigError(f"{self.file}: {key}: {message}{got}")

    def table(self, data: Any, key: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.error(key, "must be a table", data)
        return data

    def unknown(self, data: dict[str, Any], allowed: set[str] | tuple[str, ...],
                prefix: str) -> None:
        for k in data:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else k
                raise self.error(where, f"unknown key (allowed: {', '.join(sorted(allowed))})",
                                 data[k])

    def string(self, data: dict[str, Any], key: str, path: str, default: Any = None,
               required: bool = False) -> Any:
        if key not in data:
            if required:
                raise self.error(path, "is required", show=False)
            return default
        v = data[key]
        if not isinstance(v, str):
            raise self.error(path, "must be a string", v)
        return v

    def choice(self, data: dict[str, Any], key: str, path: str, choices: tuple[str, ...],
               default: str) -> str:
        v = self.string(data, key, path, default)
        if v not in choices:
            raise self.error(path, f"must be one of {', '.join(choices)}", v)
        return v

    def file_path(self, value: str, path: str, what: str) -> Path:
        if value.startswith("image:"):
            from vmrun.image import resolve_image_path

            p = resolve_image_path(value)
            if not p.exists():
                name = value.removeprefix("image:").split("/")[0]
                raise self.error(path, f"{what} {p} is not built yet: run `vmrun image build "
                                 f"{name}`", value)
            return p
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = self.file.parent / p
        if not p.exists():
            raise self.error(path, f"{what} does not exist", value)
        if p.is_dir():
            raise self.error(path, f"{what} is a directory", value)
        return p


def parse_machine(text: str, file: Path,
                  device_validator: Callable[[Path, str, str, dict[str, Any]], Any] | None
                  = None) -> MachineConfig:
    c = _Checker(file)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: {e}") from None
    c.unknown(data, TOP_KEYS, "")

    name = c.string(data, "name", "name", required=True)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise c.error("name", "must be 1-64 characters of A-Z a-z 0-9 . _ -", name)

    cpus = data.get("cpus", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, int):
        raise c.error("cpus", "must be an integer", cpus)
    if not 1 <= cpus <= 16:
        raise c.error("cpus", "must be between 1 and 16", cpus)

    mem_value = data.get("memory", "256M")
    if isinstance(mem_value, int) and not isinstance(mem_value, bool):
        memory = mem_value * MiB   # a bare number is MiB, as xhyve's -m
    else:
        try:
            memory = parse_size(mem_value)
        except ValueError as e:
            raise c.error("memory", str(e), mem_value) from None
    if not 16 * MiB <= memory <= 1 << 40:
        raise c.error("memory", "must be between 16M and 1T", mem_value)
    if memory % MiB:
        raise c.error("memory", "must be a whole number of MiB", mem_value)

    uuid_text = c.string(data, "uuid", "uuid")
    if uuid_text is None:
        machine_uuid = uuidlib.uuid5(UUID_NAMESPACE, name)
    else:
        try:
            machine_uuid = uuidlib.UUID(uuid_text)
        except ValueError:
            raise c.error("uuid", "is not a UUID", uuid_text) from None

    rtc = c.choice(data, "rtc", "rtc", ("utc", "localtime"), "utc")
    on_reboot = c.choice(data, "on_reboot", "on_reboot", ("restart", "exit"), "restart")
    on_io = c.choice(data, "on_unhandled_io", "on_unhandled_io", ("ignore", "exit"), "ignore")

    cpu_t = c.table(data.get("cpu", {}), "cpu")
    c.unknown(cpu_t, {"profile", "features"}, "cpu")
    profile = c.choice(cpu_t, "profile", "cpu.profile", ("host", "compat"), "host")
    feats_t = c.table(cpu_t.get("features", {}), "cpu.features")
    features: dict[str, bool] = {}
    for k, v in feats_t.items():
        if k not in FEATURES:
            raise c.error(f"cpu.features.{k}", "unknown CPU feature (names as in "
                          "/proc/cpuinfo)", v)
        if not isinstance(v, bool):
            raise c.error(f"cpu.features.{k}", "must be true or false", v)
        features[k] = v

    if "boot" not in data:
        raise c.error("boot", "is required (a [boot] table with kernel = ...)", show=False)
    boot_t = c.table(data["boot"], "boot")
    c.unknown(boot_t, {"kernel", "initrd", "cmdline"}, "boot")
    kernel = c.file_path(c.string(boot_t, "kernel", "boot.kernel", required=True),
                         "boot.kernel", "kernel")
    initrd_text = c.string(boot_t, "initrd", "boot.initrd")
    initrd = c.file_path(initrd_text, "boot.initrd", "initrd") if initrd_text else None
    cmdline = c.string(boot_t, "cmdline", "boot.cmdline", "")
    if len(cmdline.encode()) > 4095:
        raise c.error("boot.cmdline", f"is {len(cmdline.encode())} bytes (max 4095)",
                      show=False)

    serial: dict[str, SerialConfig] = {}
    if "serial" not in data:
        serial["com1"] = SerialConfig("stdio")
    else:
        ser_t = c.table(data["serial"], "serial")
        c.unknown(ser_t, SERIAL_PORTS, "serial")
        for port, t in ser_t.items():
            t = c.table(t, f"serial.{port}")
            c.unknown(t, {"backend", "path"}, f"serial.{port}")
            backend = c.string(t, "backend", f"serial.{port}.backend", required=True)
            if backend not in SERIAL_BACKENDS:
                raise c.error(f"serial.{port}.backend",
                              f"must be one of {', '.join(SERIAL_BACKENDS)}", backend)
            path_text = c.string(t, "path", f"serial.{port}.path")
            spath = None
            if backend in ("file", "socket"):
                if path_text is None:
                    raise c.error(f"serial.{port}.path", f"is required for the {backend} "
                                  "backend", show=False)
                spath = Path(path_text).expanduser()
                if not spath.is_absolute():
                    spath = file.parent / spath
                if not spath.parent.is_dir():
                    raise c.error(f"serial.{port}.path", "its directory does not exist",
                                  path_text)
            elif path_text is not None:
                raise c.error(f"serial.{port}.path", f"is not used by the {backend} backend",
                              path_text)
            serial[port] = SerialConfig(backend, spath)
        stdio = [p for p, s in serial.items() if s.backend == "stdio"]
        if len(stdio) > 1:
            raise c.error(f"serial.{stdio[1]}.backend", f"only one port can use stdio "
                          f"({stdio[0]} already does)", "stdio")

    devices: dict[str, Any] = {}
    taken: dict[tuple[int, int], str] = {}
    dev_t = c.table(data.get("devices", {}), "devices")
    for dev_id, t in dev_t.items():
        prefix = f"devices.{dev_id}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", dev_id):
            raise c.error(prefix, "device ids are letters, digits, _ and -", dev_id)
        t = c.table(t, prefix)
        c.string(t, "model", f"{prefix}.model", required=True)
        if "slot" in t:
            slot = _parse_slot(c, t["slot"], f"{prefix}.slot")
            if slot in taken:
                raise c.error(f"{prefix}.slot", f"slot {slot[0]}:{slot[1]} is taken by "
                              f"devices.{taken[slot]}", t["slot"])
            taken[slot] = dev_id
        devices[dev_id] = device_validator(file, prefix, dev_id, t) if device_validator \
            else dict(t)
    if device_validator is not None:
        from vmrun.plugins.placement import check_devices

        check_devices(file, devices)

    return MachineConfig(file, name, cpus, memory, machine_uuid, rtc, on_reboot, on_io,
                         CpuConfig(profile, features), BootConfig(kernel, initrd, cmdline),
                         serial, devices)


def _parse_slot(c: _Checker, value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        slot, func = value, 0
    elif isinstance(value, str) and re.fullmatch(r"\d+(:\d+)?", value):
        s, _, f = value.partition(":")
        slot, func = int(s), int(f or 0)
    else:
        raise c.error(key, "must be a slot number or \"slot:func\"", value)
    if not 0 <= slot <= 31:
        raise c.error(key, "slot must be between 0 and 31", value)
    if not 0 <= func <= 7:
        raise c.error(key, "function must be between 0 and 7", value)
    return slot, func


def load_machine(path: str | Path,
                 device_validator: Callable[[Path, str, str, dict[str, Any]], Any] | None
                 = None, *, validate_devices: bool = True) -> MachineConfig:
    """Load and validate a machine file. Devices are checked against the installed plugins
    unless ``validate_devices`` is False (then they stay raw tables)."""
    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{file}: machine file does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: cannot read machine file: {e}") from None
    if device_validator is None and validate_devices:
        from vmrun.plugins.placement import validate_device

        device_validator = validate_device
    return parse_machine(text, file, device_validator)
