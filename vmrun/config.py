"""The TOML machine file: loading, and complete validation before anything is created.

A VM that fails half-way through start-up (after the serial socket exists, after guest memory
is mapped) leaves debris and hides the real mistake, so every check that only needs the file
happens here, up front. Every problem is one line, ``FILE: key.path: what is wrong (got
VALUE)``, raised as :class:`ConfigError` (exit code 4); VALUE is written the way TOML would
write what the user typed. Paths are relative to the machine file's directory, ``~`` is
expanded, and ``image:NAME/FILE`` names a file of a guest image built by ``vmrun image build
NAME`` (see :mod:`vmrun.image`). ``machines/reference.toml`` documents every key.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from vmrun.cloudinit import (
    CloudInitConfig,
    check_network_config_file,
    check_user_data_file,
    default_user,
    machine_dir,
)
from vmrun.core import boot as bootloader
from vmrun.core.cpufeatures import FEATURES
from vmrun.errors import ConfigError
from vmrun.plugins import placement
from vmrun.plugins.registry import PATH_ROOTS
from vmrun.units import GiB as GiB
from vmrun.units import KiB as KiB
from vmrun.units import (
    MiB,
    TiB,
    check_input_file,
    check_output_file,
    check_path_text,
    file_identity,
    file_kind,
    format_value,
    key_part,
    parse_size,
    parse_slot,
)

# ConfigError, parse_size and parse_slot live in the leaf modules vmrun.errors and vmrun.units
# (so that vmrun.plugins and vmrun.block never need this module); they, and the size constants,
# stay importable from here under their old names.

# Fixed forever: the default UUID (and the MAC addresses derived from it) of a machine must not
# change between vmrun versions, or the guest would see a new NIC and a new SMBIOS identity.
UUID_NAMESPACE = uuidlib.UUID("6f0c5d3e-6a0b-4f4e-9c1e-76d6e2b3a001")

MAX_MACHINE_FILE = MiB             # the largest machine file we read (bytes)
MAX_TOML_DEPTH = 100               # arrays / inline tables nested deeper are refused
MAX_CPUS = 16
MIN_MEMORY, MAX_MEMORY = 16 * MiB, TiB
DEFAULT_MEMORY = "256M"            # xhyve's default
MAX_CMDLINE = 4095                 # bytes, without the terminating NUL
UNIX_PATH_MAX = 107                # sun_path is 108 bytes including the NUL
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
IMAGE_RE = re.compile(r"image:([A-Za-z0-9._-]+)/([A-Za-z0-9._/-]+)")

RTC_MODES = ("utc", "localtime")
ON_REBOOT = ("restart", "exit")
ON_UNHANDLED_IO = ("ignore", "exit")
CPU_PROFILES = ("host", "compat")
SERIAL_PORTS = ("com1", "com2", "com3", "com4", "debugcon")
SERIAL_BACKENDS = ("stdio", "file", "socket", "pty", "null")
PATH_BACKENDS = ("file", "socket")

# The keys each table accepts (machines/reference.toml must document all of them; a test
# checks). [cpu.features] takes feature names, [devices.ID] also the model's own options.
TOP_KEYS = ("name", "cpus", "memory", "huge_pages", "uuid", "rtc", "on_reboot",
            "on_unhandled_io", "control_socket", "cpu", "boot", "serial", "devices",
            "cloud-init")
CPU_KEYS = ("profile", "features")
CLOUD_INIT_KEYS = ("user", "hostname", "ssh_authorized_keys", "packages", "runcmd",
                   "write_files", "user_data", "network_config")
WRITE_FILE_KEYS = ("path", "content", "permissions", "owner", "append")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
SSH_KEY_RE = re.compile(r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+"
                        r"( [^\n]*)?")
PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.:=~-]*")
BOOT_KEYS = ("kernel", "initrd", "cmdline")
SERIAL_KEYS = ("backend", "path")
DEVICE_KEYS = ("model", "slot")

DeviceValidator = Callable[[Path, str, str, dict[str, Any]], Any]
#: ``checker(file, devices, taken)``: ``taken`` maps the host files the machine's own keys
#: already use (``file_identity``) to their key paths (``serial.com1.path``).
DevicesChecker = Callable[[Path, dict[str, Any], dict[Any, str]], None]


@dataclass(frozen=True)
class CpuConfig:
    """``[cpu]``: the profile, then explicit per-feature overrides (applied last)."""

    profile: str = "host"
    features: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class BootConfig:
    """``[boot]``: resolved, existing kernel and initrd files and the kernel command line."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class SerialConfig:
    """One ``[serial.comN]`` port (or ``[serial.debugcon]``, the output-only debug console at
    port 0xE9): a backend, and the path for ``file`` and ``socket``."""

    backend: str
    path: Path | None = None


@dataclass(frozen=True)
class MachineConfig:
    """A validated machine file. ``memory`` is in bytes; ``devices`` maps each ``[devices.ID]``
    to what the device validator made of it (the raw table when there was none)."""

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
    huge_pages: bool | None = None      # None: "auto"
    cloud_init: CloudInitConfig | None = None
    control_socket: Path | None = None  # None: in the VM's state directory (vmrun.instances)


# format_value (values as TOML writes them) lives in vmrun.units, shared with the plugin
# system's errors; it stays importable from here.
_key_part = key_part


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{_key_part(key)}" if prefix else _key_part(key)


def _alternatives(choices: Iterable[str]) -> str:
    quoted = [f'"{c}"' for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


_MISSING = object()


class _Checker:
    """Builds the one-line errors for one machine file and checks values against the schema."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def error(self, key: str, message: str, value: Any = _MISSING) -> ConfigError:
        got = "" if value is _MISSING else f" (got {format_value(value)})"
        return ConfigError(f"{self.file}: {key}: {message}{got}")

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, "must be a table", value)
        return value

    def unknown(self, data: dict[str, Any], allowed: Iterable[str], prefix: str) -> None:
        allowed = tuple(allowed)
        for k, v in data.items():
            if k not in allowed:
                near = difflib.get_close_matches(k.lower(), allowed, n=1)
                hint = f'did you mean "{near[0]}"?' if near else \
                    f"allowed: {', '.join(allowed)}"
                raise self.error(_join(prefix, k), f"unknown key ({hint})", v)

    def string(self, data: dict[str, Any], key: str, path: str, default: Any = None,
               required: bool = False, empty_ok: bool = True) -> Any:
        if key not in data:
            if required:
                raise self.error(path, "is required")
            return default
        v = data[key]
        if not isinstance(v, str):
            raise self.error(path, "must be a string", v)
        if not v and not empty_ok:
            raise self.error(path, "must not be empty", v)
        return v

    def integer(self, data: dict[str, Any], key: str, path: str, default: int, low: int,
                high: int) -> int:
        v = data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(path, "must be an integer", v)
        if not low <= v <= high:
            raise self.error(path, f"must be between {low} and {high}", v)
        return v

    def choice(self, data: dict[str, Any], key: str, path: str, choices: tuple[str, ...],
               default: str) -> str:
        v = self.string(data, key, path, default)
        if v not in choices:
            raise self.error(path, f"must be {_alternatives(choices)}", v)
        return v

    def local_path(self, value: str, key: str = "") -> Path:
        """A path from the file: ``~`` expanded, relative to the machine file, absolute."""
        try:
            check_path_text(value)
        except ValueError as e:
            raise self.error(key or "path", str(e), value) from None
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = self.file.parent / p
        return p.absolute()

    def input_file(self, value: str, path: str, what: str) -> Path:
        """An existing, readable file: a local path or ``image:NAME/FILE``."""
        if value.startswith("image:"):
            return self.image_file(value, path, what)
        p = self.local_path(value, path)
        try:
            check_input_file(p, what)
        except ValueError as e:
            raise self.error(path, str(e), value) from None
        return p

    def image_file(self, value: str, path: str, what: str) -> Path:
        from vmrun.image import IMAGES, resolve_image_path

        m = IMAGE_RE.fullmatch(value)
        if not m or ".." in m.group(2).split("/"):
            raise self.error(path, 'must look like "image:NAME/FILE"', value)
        name = m.group(1)
        from vmrun.catalogue import CATALOGUE

        if name not in IMAGES and name not in CATALOGUE:
            known = ", ".join([*IMAGES, *CATALOGUE])
            raise self.error(path, f"unknown image {name} (known: {known})", value)
        p = resolve_image_path(value)
        if not p.is_file() and name in CATALOGUE:
            raise self.error(path, f"{what} {p} is not pulled yet: run `vmrun image pull "
                             f"{name}` (vmrun up pulls it)", value)
        if not p.is_file():
            raise self.error(path, f"{what} {p} is not built yet: run `vmrun image build "
                             f"{name}`", value)
        try:
            check_input_file(p, what)
        except ValueError as e:
            raise self.error(path, str(e), value) from None
        return p


def _too_deep_line(text: str) -> int:
    """The line where brackets first nest deeper than MAX_TOML_DEPTH (strings not parsed:
    a good guess for the message), else the last line."""
    depth = 0
    for n, line in enumerate(text.splitlines(), 1):
        for ch in line:
            if ch in "[{":
                depth += 1
                if depth > MAX_TOML_DEPTH:
                    return n
            elif ch in "]}":
                depth -= 1
    return text.count("\n") + 1


def _toml_depth(value: Any) -> int:
    """How deep arrays and inline tables nest in ``value`` (iteratively: no recursion)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d < MAX_TOML_DEPTH + 1:
                todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _toml_error(file: Path, text: str, err: Exception) -> ConfigError:
    """tomllib says "Invalid value (at line 3, column 7)"; we say "FILE: line 3: ..."."""
    message = str(err)
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.S)
    if m:
        line, detail = m.group(2), f"{m.group(1)} (column {m.group(3)})"
    else:
        line = str(text.count("\n") + 1)
        detail = message.replace(" (at end of document)", " (at the end of the file)")
    # "Cannot declare ('boot', 'x') twice" -> "Cannot declare [boot.x] twice"
    detail = re.sub(r"\(((?:'[^']*',? ?)+)\)",
                    lambda k: "[" + ".".join(re.findall(r"'([^']*)'", k.group(1))) + "]", detail)
    return ConfigError(f"{file}: line {line}: TOML syntax: {detail[:1].lower()}{detail[1:]}")


def parse_machine(text: str, file: Path, device_validator: DeviceValidator | None = None,
                  devices_checker: DevicesChecker | None = None, *,
                  check_contents: bool = False) -> MachineConfig:
    """Validate the machine file ``text`` (read from ``file``) into a :class:`MachineConfig`.

    ``device_validator(file, "devices.ID", ID, table)`` turns each ``[devices.ID]`` table into
    the object kept in ``MachineConfig.devices`` (raising ConfigError for bad options); without
    one the tables stay dicts. ``devices_checker(file, devices)`` then runs the checks that
    involve several devices; it defaults to the plugin system's when the validator is.

    ``check_contents`` (what :func:`load_machine` does) then also looks into the files and the
    host, last, so that every problem of the file itself is reported first: the kernel's
    headers, whether the initrd fits into the machine's RAM, whether the host can map that RAM.
    """
    file = Path(file)
    c = _Checker(file)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(file, text, e) from None
    except RecursionError:
        raise ConfigError(f"{file}: line {_too_deep_line(text)}: TOML syntax: arrays or inline "
                          f"tables nested too deeply (at most {MAX_TOML_DEPTH} levels)") from None
    except ValueError as e:   # an integer of more than 4300 digits (int_max_str_digits)
        m = re.search(r"\d{4000}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else text.count("\n") + 1
        detail = "an integer has too many digits" if "digits" in str(e) else str(e)
        raise ConfigError(f"{file}: line {line}: TOML syntax: {detail}") from None
    if _toml_depth(data) > MAX_TOML_DEPTH:
        raise ConfigError(f"{file}: line {_too_deep_line(text)}: TOML syntax: arrays or inline "
                          f"tables nested too deeply (at most {MAX_TOML_DEPTH} levels)")
    c.unknown(data, TOP_KEYS, "")

    name = c.string(data, "name", "name", required=True)
    if not NAME_RE.fullmatch(name):
        raise c.error("name", "must be 1-64 characters of A-Z a-z 0-9 . _ -", name)
    cpus = c.integer(data, "cpus", "cpus", 1, 1, MAX_CPUS)
    memory = _memory(c, data.get("memory", DEFAULT_MEMORY))
    uuid_text = c.string(data, "uuid", "uuid")
    if uuid_text is None:
        machine_uuid = uuidlib.uuid5(UUID_NAMESPACE, name)
    else:
        try:
            machine_uuid = uuidlib.UUID(uuid_text)
        except ValueError:
            raise c.error("uuid", "is not a UUID (such as "
                          '"0b7f3a36-95a4-4d4e-a7a5-3cf8b9b2d9a1")', uuid_text) from None
    rtc = c.choice(data, "rtc", "rtc", RTC_MODES, "utc")
    on_reboot = c.choice(data, "on_reboot", "on_reboot", ON_REBOOT, "restart")
    on_io = c.choice(data, "on_unhandled_io", "on_unhandled_io", ON_UNHANDLED_IO, "ignore")
    huge_pages = data.get("huge_pages", "auto")
    if huge_pages == "auto":
        huge_pages = None
    elif not isinstance(huge_pages, bool):
        raise c.error("huge_pages", 'must be true, false or "auto"', huge_pages)

    cpu = _cpu(c, data.get("cpu", {}))
    boot = _boot(c, data)
    serial = _serial(c, data)
    control_socket = _control_socket(c, data, serial)
    roots = PATH_ROOTS.set({"state": machine_dir(name)})
    try:
        devices = _devices(c, data.get("devices", {}), device_validator)
    finally:
        PATH_ROOTS.reset(roots)
    if devices_checker is None and device_validator is not None:
        devices_checker = _plugin_checker(device_validator)
    if devices_checker is not None:
        taken = {file_identity(p.path): f"serial.{port}.path"
                 for port, p in serial.items() if p.path is not None}
        devices_checker(file, devices, taken)
    if check_contents:
        _check_memory_fits_host(c, memory, data.get("memory", DEFAULT_MEMORY))
        _check_boot_files(c, data["boot"], boot, memory)

    cloud_init = _cloud_init(c, data, name)
    return MachineConfig(file, name, cpus, memory, machine_uuid, rtc, on_reboot, on_io, cpu,
                         boot, serial, devices, huge_pages, cloud_init,
                         control_socket)


def _cloud_init(c: _Checker, data: dict[str, Any], name: str) -> CloudInitConfig | None:
    """The ``[cloud-init]`` table: what vmrun puts into the NoCloud seed (see
    :mod:`vmrun.cloudinit`). ``user_data`` (a whole file, checked to be YAML) excludes the
    keys that would build one."""
    if "cloud-init" not in data:
        return None
    t = c.table(data["cloud-init"], "cloud-init")
    c.unknown(t, CLOUD_INIT_KEYS, "cloud-init")
    if "user_data" in t:
        clash = [k for k in ("user", "ssh_authorized_keys", "packages", "runcmd",
                             "write_files") if k in t]
        if clash:
            raise c.error(f"cloud-init.{clash[0]}", "cannot be combined with user_data (put it "
                          "into that file)", t[clash[0]])
    user = c.string(t, "user", "cloud-init.user", default_user(), empty_ok=False)
    if not USER_RE.fullmatch(user) or user == "root":
        raise c.error("cloud-init.user", "must be a user name (a-z, 0-9, _ and -, at most 32, "
                      "not root)", user)
    hostname = c.string(t, "hostname", "cloud-init.hostname", name.replace("_", "-")[:63])
    if not HOSTNAME_RE.fullmatch(hostname):
        raise c.error("cloud-init.hostname", "must be a host name (letters, digits and -, at "
                      "most 63)", hostname)
    keys = None
    if "ssh_authorized_keys" in t:
        keys = tuple(_string_list(c, t["ssh_authorized_keys"], "cloud-init.ssh_authorized_keys"))
        for i, k in enumerate(keys):
            if not SSH_KEY_RE.fullmatch(k):
                raise c.error(f"cloud-init.ssh_authorized_keys[{i}]", "is not an ssh public key "
                              '("ssh-ed25519 AAAA... comment")', k)
    packages = tuple(_string_list(c, t.get("packages", []), "cloud-init.packages"))
    for i, pkg in enumerate(packages):
        if not PACKAGE_RE.fullmatch(pkg):
            raise c.error(f"cloud-init.packages[{i}]", "is not a package name", pkg)
    runcmd = t.get("runcmd", [])
    if not isinstance(runcmd, list):
        raise c.error("cloud-init.runcmd", "must be an array of commands", runcmd)
    for i, cmd in enumerate(runcmd):
        ok = isinstance(cmd, str) or (isinstance(cmd, list) and cmd
                                      and all(isinstance(a, str) for a in cmd))
        if not ok:
            raise c.error(f"cloud-init.runcmd[{i}]", "must be a string (run by sh) or an array "
                          "of strings (argv)", cmd)
    write_files = []
    for i, wf in enumerate(_table_list(c, t.get("write_files", []), "cloud-init.write_files")):
        key = f"cloud-init.write_files[{i}]"
        c.unknown(wf, WRITE_FILE_KEYS, key)
        path = c.string(wf, "path", f"{key}.path", required=True)
        if not path.startswith("/"):
            raise c.error(f"{key}.path", "must be an absolute path in the guest", path)
        c.string(wf, "content", f"{key}.content", "")
        perm = c.string(wf, "permissions", f"{key}.permissions", "0644")
        if not re.fullmatch(r"0?[0-7]{3,4}", perm):
            raise c.error(f"{key}.permissions", 'must be octal, e.g. "0644"', perm)
        c.string(wf, "owner", f"{key}.owner", "root:root")
        if not isinstance(wf.get("append", False), bool):
            raise c.error(f"{key}.append", "must be true or false", wf["append"])
        write_files.append(dict(wf))
    user_data = None
    if "user_data" in t:
        text = c.string(t, "user_data", "cloud-init.user_data", empty_ok=False)
        user_data = c.input_file(text, "cloud-init.user_data", "user-data file")
        try:
            check_user_data_file(user_data)
        except (ValueError, UnicodeDecodeError) as e:
            raise c.error("cloud-init.user_data", f"{user_data} {e}", text) from None
    net: Any = None
    if "network_config" in t:
        v = t["network_config"]
        if isinstance(v, dict):
            net = v
        elif isinstance(v, str) and v:
            net = c.input_file(v, "cloud-init.network_config", "network-config file")
            try:
                check_network_config_file(net)
            except (ValueError, UnicodeDecodeError) as e:
                raise c.error("cloud-init.network_config", f"{net} {e}", v) from None
        else:
            raise c.error("cloud-init.network_config", "must be a table (network config "
                          "version 2) or the path of a YAML file", v)
    return CloudInitConfig(user, hostname, keys, packages, tuple(runcmd), tuple(write_files),
                           user_data, net)


def _string_list(c: _Checker, value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise c.error(key, "must be an array of strings", value)
    return value


def _table_list(c: _Checker, value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise c.error(key, "must be an array of tables", value)
    return value


def _control_socket(c: _Checker, data: dict[str, Any],
                    serial: dict[str, SerialConfig]) -> Path | None:
    """Where the QMP control socket listens instead of the state directory: a socket path
    as a serial port's (its directory exists, an existing non-socket is never replaced),
    not one a serial port uses."""
    text = c.string(data, "control_socket", "control_socket", empty_ok=False)
    if text is None:
        return None
    p = _serial_path(c, "socket", text, "control_socket")
    ident = file_identity(p)
    for port, sc in serial.items():
        if sc.path is not None and file_identity(sc.path) == ident:
            raise c.error("control_socket", f"serial.{port} already uses it", text)
    return p


def _memory(c: _Checker, value: Any) -> int:
    """A bare integer is MiB (as xhyve's ``-m 512``); a string needs its unit, because
    ``"512"`` meaning 512 bytes would always be a mistake."""
    if isinstance(value, int) and not isinstance(value, bool):
        memory = value * MiB
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        raise c.error("memory", "needs a unit: K, M, G or T (a bare integer means MiB)", value)
    else:
        try:
            memory = parse_size(value)
        except ValueError:
            raise c.error("memory", 'must be a size such as "512M" or "2G", or an integer '
                          "number of MiB", value) from None
    if not MIN_MEMORY <= memory <= MAX_MEMORY:
        raise c.error("memory", "must be between 16M and 1T", value)
    if memory % MiB:
        raise c.error("memory", "must be a whole number of MiB", value)
    return memory


def host_memory() -> int | None:
    """MemTotal + SwapTotal of this host in bytes (None where /proc/meminfo says nothing)."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(info[k].split()[0]) * KiB for k in ("MemTotal", "SwapTotal"))
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _check_memory_fits_host(c: _Checker, memory: int, value: Any) -> None:
    """Guest RAM is one anonymous mapping per slot: more than the host's RAM and swap cannot
    be backed, and the guest would die (or take the host down) when it touches it."""
    host = host_memory()
    if host is not None and memory > host:
        raise c.error("memory", f"is more than this host's RAM and swap ({host // MiB} MiB)",
                      value)


def _check_boot_files(c: _Checker, table: dict[str, Any], boot: BootConfig, memory: int) -> None:
    """The kernel's headers as the loader will read them, and the initrd against the RAM the
    boot protocol can put it in (see :func:`vmrun.core.boot.initrd_limit`)."""
    try:
        fmt, kernel_end, initrd_top = bootloader.probe_kernel(boot.kernel,
                                                              boot.kernel.stat().st_size)
    except ValueError as e:
        raise c.error("boot.kernel", f"kernel {boot.kernel}: {e}", table["kernel"]) from None
    except OSError as e:
        raise c.error("boot.kernel", f"kernel {boot.kernel}: {e.strerror}",
                      table["kernel"]) from None
    low = min(memory, bootloader.layout.LOW_RAM_END)
    if kernel_end > low:
        raise c.error("boot.kernel", f"kernel {boot.kernel} needs RAM up to "
                      f"{-(-kernel_end // MiB)} MiB; give the machine more memory",
                      table["kernel"])
    if boot.initrd is None:
        return
    size = boot.initrd.stat().st_size
    limit = bootloader.initrd_limit(memory, kernel_end, initrd_top)
    if size > limit:
        if initrd_top < min(memory, bootloader.INITRD_TOP):
            where = f"below the kernel's initrd_addr_max {initrd_top - 1:#x}, above the kernel"
            hint = "the kernel allows no larger initrd"
        else:
            where = "below min(memory, 896 MiB), above the kernel"
            hint = "give the machine more memory"
        raise c.error("boot.initrd", f"initrd {boot.initrd} of {size} bytes does not fit: with "
                      f"{memory // MiB} MiB of RAM and this kernel at most {limit} bytes fit "
                      f"({where}); {hint}", table["initrd"])


def _cpu(c: _Checker, value: Any) -> CpuConfig:
    t = c.table(value, "cpu")
    c.unknown(t, CPU_KEYS, "cpu")
    profile = c.choice(t, "profile", "cpu.profile", CPU_PROFILES, "host")
    features: dict[str, bool] = {}
    for k, v in c.table(t.get("features", {}), "cpu.features").items():
        key = _join("cpu.features", k)
        if k not in FEATURES:
            near = difflib.get_close_matches(k.lower(), FEATURES, n=1)
            hint = f', did you mean "{near[0]}"?' if near else " (names as in /proc/cpuinfo)"
            raise c.error(key, f"unknown CPU feature{hint}", v)
        if not isinstance(v, bool):
            raise c.error(key, "must be true or false", v)
        features[k] = v
    return CpuConfig(profile, features)


def _boot(c: _Checker, data: dict[str, Any]) -> BootConfig:
    if "boot" not in data:
        raise c.error("boot", 'is required (a [boot] table with kernel = "...")')
    t = c.table(data["boot"], "boot")
    c.unknown(t, BOOT_KEYS, "boot")
    kernel_text = c.string(t, "kernel", "boot.kernel", required=True, empty_ok=False)
    kernel = c.input_file(kernel_text, "boot.kernel", "kernel")
    initrd_text = c.string(t, "initrd", "boot.initrd", empty_ok=False)
    initrd = None if initrd_text is None else c.input_file(initrd_text, "boot.initrd", "initrd")
    cmdline = c.string(t, "cmdline", "boot.cmdline", "")
    size = len(cmdline.encode())
    if size > MAX_CMDLINE:
        raise c.error("boot.cmdline", f"is {size} bytes long (at most {MAX_CMDLINE})", cmdline)
    if "\0" in cmdline:
        raise c.error("boot.cmdline", "must not contain a NUL character", cmdline)
    return BootConfig(kernel, initrd, cmdline)


def _serial(c: _Checker, data: dict[str, Any]) -> dict[str, SerialConfig]:
    if "serial" not in data:
        return {"com1": SerialConfig("stdio")}
    ports = c.table(data["serial"], "serial")
    c.unknown(ports, SERIAL_PORTS, "serial")
    serial: dict[str, SerialConfig] = {}
    stdio: str | None = None
    used: dict[Any, str] = {}
    for port, value in ports.items():
        prefix = f"serial.{port}"
        t = c.table(value, prefix)
        c.unknown(t, SERIAL_KEYS, prefix)
        backend = c.string(t, "backend", f"{prefix}.backend", required=True)
        if backend not in SERIAL_BACKENDS:
            raise c.error(f"{prefix}.backend", f"must be {_alternatives(SERIAL_BACKENDS)}",
                          backend)
        if backend == "stdio":
            if stdio is not None:
                raise c.error(f"{prefix}.backend", f"only one port can use stdio (serial."
                              f"{stdio} does)", backend)
            stdio = port
        path_text = c.string(t, "path", f"{prefix}.path", empty_ok=False)
        path = None
        if backend in PATH_BACKENDS:
            if path_text is None:
                raise c.error(f"{prefix}.path", f"is required for the {backend} backend")
            path = _serial_path(c, backend, path_text, f"{prefix}.path")
            ident = file_identity(path)      # hard links and symlinks are the same file
            if ident in used:
                raise c.error(f"{prefix}.path", f"serial.{used[ident]} already uses it",
                              path_text)
            used[ident] = port
        elif path_text is not None:
            raise c.error(f"{prefix}.path", f"is only for the file and socket backends, not "
                          f"{backend}", path_text)
        serial[port] = SerialConfig(backend, path)
    return serial


def _serial_path(c: _Checker, backend: str, text: str, key: str) -> Path:
    """Where a file backend writes or a socket backend listens: its directory must exist (we
    create no directories), and an existing non-socket is never replaced by a socket. A file
    backend writes to a regular file or a character device, never a FIFO (opening one would
    wait for a reader), a socket or a directory."""
    p = c.local_path(text, key)
    if not p.parent.is_dir():
        raise c.error(key, f"directory {p.parent} does not exist", text)
    if p.is_dir():
        raise c.error(key, f"{p} is a directory", text)
    if backend == "file":
        try:
            check_output_file(p)
        except ValueError as e:
            raise c.error(key, str(e), text) from None
    elif backend == "socket":
        if len(os.fsencode(p)) > UNIX_PATH_MAX:
            raise c.error(key, f"unix socket paths are at most {UNIX_PATH_MAX} bytes, {p} is "
                          f"{len(os.fsencode(p))}", text)
        if p.exists() and not stat.S_ISSOCK(p.stat().st_mode):
            raise c.error(key, f"{p} exists and is not a socket", text)
    return p


def _devices(c: _Checker, value: Any, validator: DeviceValidator | None) -> dict[str, Any]:
    devices: dict[str, Any] = {}
    taken: dict[tuple[int, int], str] = {}
    for dev_id, t in c.table(value, "devices").items():
        prefix = _join("devices", dev_id)
        if not DEVICE_ID_RE.fullmatch(dev_id):
            raise c.error(prefix, "device ids are letters, digits, _ and -", dev_id)
        t = c.table(t, prefix)
        c.string(t, "model", f"{prefix}.model", required=True, empty_ok=False)
        if "slot" in t:
            slot = _parse_slot(c, t["slot"], f"{prefix}.slot")
            if slot in taken:
                raise c.error(f"{prefix}.slot", f"slot {slot[0]}:{slot[1]} is taken by "
                              f"devices.{taken[slot]}", t["slot"])
            taken[slot] = dev_id
        devices[dev_id] = validator(c.file, prefix, dev_id, t) if validator else dict(t)
    return devices


def _parse_slot(c: _Checker, value: Any, key: str) -> tuple[int, int]:
    """``3`` or ``"3"`` is slot 3 function 0; ``"3:1"`` is slot 3 function 1."""
    try:
        return parse_slot(value)
    except ValueError as e:
        raise c.error(key, str(e), value) from None


def _plugin_checker(validator: DeviceValidator) -> DevicesChecker | None:
    """The plugin system's validator comes with cross-device checks (one image per device);
    any other validator brings its own or none."""
    return placement.check_devices if validator is placement.validate_device else None


def load_machine(path: str | Path, device_validator: DeviceValidator | None = None, *,
                 validate_devices: bool = True,
                 devices_checker: DevicesChecker | None = None) -> MachineConfig:
    """Read and validate the machine file at ``path``.

    Devices are checked against the installed device plugins (so ``MachineConfig.devices``
    holds placed devices ready for the machine) unless another ``device_validator`` is given,
    or ``validate_devices`` is False, which keeps them as raw tables.
    """
    file = Path(path)
    text = read_machine_file(file)
    if device_validator is None and validate_devices:
        device_validator = placement.validate_device
        devices_checker = devices_checker or placement.check_devices
    return parse_machine(text, file, device_validator, devices_checker, check_contents=True)


def read_machine_file(file: Path) -> str:
    """The text of the machine file: a regular file of at most MAX_MACHINE_FILE bytes, UTF-8.

    It is opened with O_NONBLOCK and checked with fstat before a byte is read, so a FIFO,
    a device such as /dev/zero or a directory is refused at once instead of read forever;
    and at most MAX_MACHINE_FILE + 1 bytes are ever read.
    """
    try:
        check_path_text(str(file))
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except ValueError as e:
        raise ConfigError(f"{file}: cannot read machine file: {e}") from None
    except FileNotFoundError:
        raise ConfigError(f"{file}: machine file does not exist") from None
    except OSError as e:
        raise ConfigError(f"{file}: cannot read machine file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{file}: cannot read machine file: it is "
                              f"{file_kind(st.st_mode)}, not a regular file")
        if st.st_size > MAX_MACHINE_FILE:
            raise ConfigError(f"{file}: machine file is {st.st_size} bytes (at most "
                              f"{MAX_MACHINE_FILE})")
        os.set_blocking(fd, True)
        chunks, got = [], 0
        while got <= MAX_MACHINE_FILE and (chunk := os.read(fd, MAX_MACHINE_FILE + 1 - got)):
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise ConfigError(f"{file}: cannot read machine file: {e.strerror}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > MAX_MACHINE_FILE:
        raise ConfigError(f"{file}: machine file is more than {MAX_MACHINE_FILE} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: machine file is not UTF-8 text (byte {e.start})") from None
