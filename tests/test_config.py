"""The machine-file loader: the shipped machine files load, every bad file in the corpus is
refused with one line naming the file, the key path and the value, and good files get the
documented defaults, sizes, paths, UUIDs and device tables."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from vmrun.config import (
    BOOT_KEYS,
    CLOUD_INIT_KEYS,
    CPU_KEYS,
    CPU_PROFILES,
    DEVICE_KEYS,
    ON_REBOOT,
    ON_UNHANDLED_IO,
    RTC_MODES,
    SERIAL_BACKENDS,
    SERIAL_KEYS,
    SERIAL_PORTS,
    TOP_KEYS,
    ConfigError,
    MachineConfig,
    SerialConfig,
    format_value,
    load_machine,
    parse_machine,
    parse_size,
    parse_slot,
)
from vmrun.core.cpufeatures import ALIASES, COMPAT_PROFILE, FEATURES, feature_names
from vmrun.errors import VmrunError
from vmrun.testing import kernels

REPO = Path(__file__).resolve().parent.parent
MACHINES = REPO / "machines"
CORPUS = Path(__file__).resolve().parent / "configs"
BAD = sorted((CORPUS / "bad").glob("*.toml"))
MiB = 1 << 20
KERNEL = kernels.pvh_elf()      # headers good enough for the loader's checks

# The machine-file schema as the design specifies it: (table, key); "*" is any port or id.
SCHEMA = [
    ("", "name"), ("", "cpus"), ("", "memory"), ("", "uuid"), ("", "rtc"), ("", "on_reboot"),
    ("", "on_unhandled_io"), ("cpu", "profile"), ("cpu", "features"), ("boot", "kernel"),
    ("boot", "initrd"), ("boot", "cmdline"), ("serial.*", "backend"), ("serial.*", "path"),
    ("devices.*", "model"), ("devices.*", "slot"),
]


@pytest.fixture(autouse=True)
def image_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake built "tiny" image, so that ``image:tiny/...`` resolves without a kernel build."""
    cache = tmp_path / "cache"
    tiny = cache / "vmrun" / "images" / "tiny"
    tiny.mkdir(parents=True)
    (tiny / "vmlinux").write_bytes(kernels.pvh_elf())
    (tiny / "initramfs.cpio").write_bytes(b"070701 fake")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return tiny


def machine(tmp_path: Path, body: str, kernel: str = "vmlinux") -> Path:
    """A machine file in ``tmp_path`` with an existing kernel and ``body`` after ``name``."""
    (tmp_path / "vmlinux").write_bytes(KERNEL)
    f = tmp_path / "m.toml"
    boot = "" if "[boot]" in body else f'[boot]\nkernel = "{kernel}"\n'
    f.write_text(f'name = "m"\n{body}\n{boot}')
    return f


def load_raw(f: Path, **kw: Any) -> MachineConfig:
    """Load without the plugin system, so device tables stay dicts."""
    return load_machine(f, validate_devices=False, **kw)


def error_of(f: Path, **kw: Any) -> str:
    with pytest.raises(ConfigError) as e:
        load_raw(f, **kw)
    return str(e.value)


# -- the shipped machine files -------------------------------------------------------------
def test_reference_loads_with_the_documented_defaults(image_cache: Path) -> None:
    cfg = load_machine(MACHINES / "reference.toml")
    assert cfg.name == "reference"
    assert (cfg.cpus, cfg.memory) == (1, 256 * MiB)
    assert (cfg.rtc, cfg.on_reboot, cfg.on_unhandled_io) == ("utc", "restart", "ignore")
    assert cfg.cpu.profile == "host" and cfg.cpu.features == {}
    assert cfg.boot.kernel == image_cache / "vmlinux"
    assert cfg.boot.initrd == image_cache / "initramfs.cpio"
    assert cfg.serial == {"com1": SerialConfig("stdio")}
    assert list(cfg.devices) == ["rng"]


def test_tiny_loads(image_cache: Path) -> None:
    cfg = load_machine(MACHINES / "tiny.toml")
    assert (cfg.name, cfg.cpus, cfg.memory) == ("tiny", 2, 128 * MiB)
    assert cfg.cpu.profile == "compat"
    assert cfg.boot.kernel == image_cache / "vmlinux"
    assert cfg.boot.initrd == image_cache / "initramfs.cpio"
    assert cfg.boot.cmdline.startswith("console=ttyS0 ")
    assert cfg.serial == {"com1": SerialConfig("stdio")}


def test_tiny_clearcpuid_names_are_known_features() -> None:
    cmdline = load_raw(MACHINES / "tiny.toml").boot.cmdline
    names = re.search(r"clearcpuid=(\S+)", cmdline).group(1).split(",")
    assert set(names) <= set(FEATURES)
    assert {n for n in names if COMPAT_PROFILE.get(n) is not False} == set()


def documented_keys(text: str) -> set[str]:
    """Every ``key =`` of the file, set or commented out, as ``table.key``, with serial ports
    and device ids written as ``*``. Table headers count as keys too."""
    keys: set[str] = set()
    table = ""
    for line in text.splitlines():
        s = line.strip().lstrip("#").strip()
        m = re.fullmatch(r"\[([A-Za-z0-9_.\-\"]+)\]", s)
        if m:
            table = re.sub(r"^(serial|devices)\.[^.]+", r"\1.*", m.group(1))
            keys.add(table)
            continue
        m = re.match(r"([A-Za-z0-9_]+)\s*=", s)
        if m:
            keys.add(f"{table}.{m.group(1)}" if table else m.group(1))
    return keys


def test_reference_documents_every_key() -> None:
    text = (MACHINES / "reference.toml").read_text()
    documented = documented_keys(text)
    wanted = {f"{t}.{k}" if t else k for t, k in SCHEMA}
    assert wanted <= documented, sorted(wanted - documented)
    # ... and every key the loader accepts (so a new key cannot go undocumented).
    loader = {k for k in TOP_KEYS if k not in ("serial", "devices")}
    loader |= {f"cloud-init.{k}" for k in CLOUD_INIT_KEYS}
    loader |= {f"cpu.{k}" for k in CPU_KEYS} | {f"boot.{k}" for k in BOOT_KEYS}
    loader |= {f"serial.*.{k}" for k in SERIAL_KEYS} | {f"devices.*.{k}" for k in DEVICE_KEYS}
    assert loader <= documented, sorted(loader - documented)
    assert wanted <= loader | {"serial.*", "devices.*"}
    for port in SERIAL_PORTS:
        assert f"[serial.{port}]" in text
    for value in (*RTC_MODES, *ON_REBOOT, *ON_UNHANDLED_IO, *CPU_PROFILES, *SERIAL_BACKENDS):
        assert f'"{value}"' in text, value
    for default in ('"256M"', "Default: 1.", "16M", "1T", "4095", "0 to 31", "0 to 7"):
        assert default in text, default


# -- the corpus of bad machine files -------------------------------------------------------
def test_the_corpus_is_big_enough() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_machine_file(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name}: first line must be '# error: ...'"
    expected = first.removeprefix("# error: ")
    with pytest.raises(ConfigError) as e:
        load_machine(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    # FILE: key.path (or "line N"): what is wrong
    assert re.match(re.escape(str(path)) + r": (line \d+|[A-Za-z0-9_.\"* -]+): \S", msg), msg
    assert expected in msg
    assert isinstance(e.value, VmrunError) and e.value.exit_code == 4


def test_nothing_is_created_while_validating(tmp_path: Path) -> None:
    f = machine(tmp_path, '[serial.com1]\nbackend = "file"\npath = "com1.log"\n'
                          '[serial.com2]\nbackend = "socket"\npath = "com2.sock"\n')
    cfg = load_raw(f)
    assert cfg.serial["com1"] == SerialConfig("file", tmp_path / "com1.log")
    assert cfg.serial["com2"] == SerialConfig("socket", tmp_path / "com2.sock")
    assert not (tmp_path / "com1.log").exists() and not (tmp_path / "com2.sock").exists()


def test_existing_socket_is_accepted(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        cfg = load_raw(machine(tmp_path, '[serial.com1]\nbackend = "socket"\npath = "s.sock"\n'))
    assert cfg.serial["com1"].path == sock_path


def test_missing_unreadable_and_binary_machine_files(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: machine file does " \
                                                "not exist"
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot read machine file")
    f = tmp_path / "bin.toml"
    f.write_bytes(b'name = "\xff"\n')
    assert error_of(f) == f"{f}: machine file is not UTF-8 text (byte 8)"


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('name = "m"\n\ncpus = = 2\n')
    msg = error_of(f)
    assert msg.startswith(f"{f}: line 3: TOML syntax: invalid value")


def test_errors_stay_on_one_line(tmp_path: Path) -> None:
    f = machine(tmp_path, 'name2 = """two\nlines"""')
    msg = error_of(f)
    assert "\n" not in msg and msg.endswith('(got "two\\nlines")')
    assert "\n" not in str(ConfigError("a\nb")) and str(ConfigError("a\nb")) == "a\\nb"


def test_long_values_are_cut_in_errors(tmp_path: Path) -> None:
    msg = error_of(machine(tmp_path, f'[boot]\nkernel = "vmlinux"\ncmdline = "{"x" * 5000}"'))
    got = msg[msg.index("(got "):]
    assert got.startswith('(got "xxx') and got.endswith('...)') and len(got) < 70


@pytest.mark.parametrize("value, text", [
    ("a\"b", '"a\\"b"'), (True, "true"), (3, "3"), (2.5, "2.5"), (float("inf"), "inf"),
    ([1, "x"], '[1, "x"]'), ({"a": 1, "b c": False}, '{a = 1, "b c" = false}'), ({}, "{}"),
])
def test_format_value_writes_toml(value: Any, text: str) -> None:
    assert format_value(value) == text


# -- good files: defaults, sizes, paths ------------------------------------------------------
def test_defaults(tmp_path: Path) -> None:
    cfg = load_raw(machine(tmp_path, ""))
    assert cfg.path == tmp_path / "m.toml"
    assert (cfg.name, cfg.cpus, cfg.memory) == ("m", 1, 256 * MiB)
    assert (cfg.rtc, cfg.on_reboot, cfg.on_unhandled_io) == ("utc", "restart", "ignore")
    assert cfg.cpu.profile == "host" and cfg.cpu.features == {}
    assert (cfg.boot.kernel, cfg.boot.initrd, cfg.boot.cmdline) == (tmp_path / "vmlinux", None,
                                                                   "")
    assert cfg.serial == {"com1": SerialConfig("stdio", None)}
    assert cfg.devices == {}


def test_every_key_set(tmp_path: Path) -> None:
    (tmp_path / "initrd.img").write_bytes(b"cpio")
    cfg = load_raw(machine(tmp_path, '''
cpus = 16
memory = "1G"
uuid = "0b7f3a36-95a4-4d4e-a7a5-3cf8b9b2d9a1"
rtc = "localtime"
on_reboot = "exit"
on_unhandled_io = "exit"
[cpu]
profile = "compat"
[cpu.features]
avx2 = false
x2apic = true
[boot]
kernel = "vmlinux"
initrd = "initrd.img"
cmdline = "console=ttyS0 quiet"
[serial.com2]
backend = "pty"
[serial.com4]
backend = "null"
'''))
    assert (cfg.cpus, cfg.memory) == (16, 1 << 30)
    assert cfg.uuid == uuid.UUID("0b7f3a36-95a4-4d4e-a7a5-3cf8b9b2d9a1")
    assert (cfg.rtc, cfg.on_reboot, cfg.on_unhandled_io) == ("localtime", "exit", "exit")
    assert cfg.cpu.profile == "compat" and cfg.cpu.features == {"avx2": False, "x2apic": True}
    assert cfg.boot.initrd == tmp_path / "initrd.img"
    assert cfg.boot.cmdline == "console=ttyS0 quiet"
    assert cfg.serial == {"com2": SerialConfig("pty"), "com4": SerialConfig("null")}


def test_an_empty_serial_table_means_no_ports(tmp_path: Path) -> None:
    assert load_raw(machine(tmp_path, "[serial]\n")).serial == {}


@pytest.mark.parametrize("memory, size", [
    ('"16M"', 16 * MiB), ('"512M"', 512 * MiB), ('"2G"', 2 << 30), ('"1T"', 1 << 40),
    ('"2g"', 2 << 30), ('"2GiB"', 2 << 30), ('"65536K"', 64 * MiB), ("512", 512 * MiB),
    ("16", 16 * MiB),
])
def test_memory_sizes(tmp_path: Path, memory: str, size: int) -> None:
    f = machine(tmp_path, f"memory = {memory}")    # parse only: 1T is more than this host has
    assert parse_machine(f.read_text(), f).memory == size


@pytest.mark.parametrize("text, size", [
    ("0", 0), ("4096", 4096), ("64K", 64 << 10), ("512M", 512 * MiB), ("2G", 2 << 30),
    ("1T", 1 << 40), ("3m", 3 * MiB), ("8KiB", 8192), ("1GB", 1 << 30), (" 2G ", 2 << 30),
    (4096, 4096), (" 3 MB ", 3 * MiB), ("512B", 512), ("20g", 20 << 30), (0, 0),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1", "1X", "1 G B", "0x10", True, -1, 1.0,
                                  "1P", "1iB", "1KK", "\u0661K", None, "2G2"])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text", ["12X", "1.5G", "", True, -7])
def test_parse_size_errors_name_the_bad_text(text: Any) -> None:
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert str(text) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value, slot", [
    (3, (3, 0)), ("3", (3, 0)), ("3:1", (3, 1)), (0, (0, 0)), ("31:7", (31, 7)), ("007", (7, 0)),
])
def test_parse_slot(value: Any, slot: tuple[int, int]) -> None:
    assert parse_slot(value) == slot


@pytest.mark.parametrize("value, message", [
    ("0x3", 'must be a slot number or "slot:function"'), ("", "must be a slot number"),
    ("3:", "must be a slot number"), (":1", "must be a slot number"), (True, "slot number"),
    (3.0, "slot number"), ("1234", "slot number"), (" 3", "slot number"),
    (32, "slot must be between 0 and 31"), (-1, "slot must be between 0 and 31"),
    ("32:0", "slot must be between 0 and 31"), ("3:8", "function must be between 0 and 7"),
])
def test_parse_slot_rejects(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_slot(value)


def test_paths_are_relative_to_the_machine_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "vm"
    (sub / "boot").mkdir(parents=True)
    (sub / "boot" / "k").write_bytes(KERNEL)
    (tmp_path / "initrd").write_bytes(b"i")
    f = sub / "m.toml"
    f.write_text('name = "m"\n[boot]\nkernel = "boot/k"\ninitrd = "../initrd"\n'
                 '[serial.com1]\nbackend = "file"\npath = "out/../com1.log"\n')
    (sub / "out").mkdir()
    monkeypatch.chdir(tmp_path.parent)   # not where the file is
    cfg = load_raw(f)
    assert cfg.boot.kernel == sub / "boot" / "k"
    assert cfg.boot.initrd.resolve() == tmp_path / "initrd"
    assert cfg.serial["com1"].path.resolve() == sub / "com1.log"


def test_relative_machine_file_gives_absolute_paths(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    machine(tmp_path, "")
    monkeypatch.chdir(tmp_path)
    cfg = load_raw("m.toml")
    assert cfg.path == Path("m.toml")
    assert cfg.boot.kernel == tmp_path / "vmlinux" and cfg.boot.kernel.is_absolute()


def test_tilde_is_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "k").write_bytes(KERNEL)
    monkeypatch.setenv("HOME", str(home))
    cfg = load_raw(machine(tmp_path, '[boot]\nkernel = "~/k"\n'))
    assert cfg.boot.kernel == home / "k"


def test_absolute_paths_and_images(tmp_path: Path, image_cache: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "k").write_bytes(KERNEL)
    cfg = load_raw(machine(tmp_path, f'[boot]\nkernel = "{other / "k"}"\n'
                                     'initrd = "image:tiny/initramfs.cpio"\n'))
    assert cfg.boot.kernel == other / "k"
    assert cfg.boot.initrd == image_cache / "initramfs.cpio"


def test_missing_image_says_how_to_build_it(tmp_path: Path, image_cache: Path) -> None:
    (image_cache / "vmlinux").unlink()
    msg = error_of(machine(tmp_path, '[boot]\nkernel = "image:tiny/vmlinux"\n'))
    assert msg == (f'{tmp_path / "m.toml"}: boot.kernel: kernel {image_cache / "vmlinux"} is '
                   'not built yet: run `vmrun image build tiny` (got "image:tiny/vmlinux")')


def test_unreadable_kernel(tmp_path: Path) -> None:
    f = machine(tmp_path, "")
    (tmp_path / "vmlinux").chmod(0)
    try:
        if os.access(tmp_path / "vmlinux", os.R_OK):
            pytest.skip("running as root: every file is readable")
        assert "boot.kernel: kernel" in error_of(f) and "is not readable" in error_of(f)
    finally:
        (tmp_path / "vmlinux").chmod(0o644)


# -- uuid ---------------------------------------------------------------------------------------
def test_default_uuid_is_stable_and_per_name(tmp_path: Path) -> None:
    a = load_raw(machine(tmp_path, "")).uuid
    assert load_raw(machine(tmp_path, "cpus = 4")).uuid == a     # only the name counts
    f = tmp_path / "n.toml"
    f.write_text('name = "n"\n[boot]\nkernel = "vmlinux"\n')
    assert load_raw(f).uuid != a
    assert a.version == 5
    # Pinned: a changed namespace would silently give every machine new MAC addresses.
    assert str(a) == "b2ae58b8-defc-5a52-a5be-891622ba6985"


def test_explicit_uuid_wins(tmp_path: Path) -> None:
    cfg = load_raw(machine(tmp_path, 'uuid = "{0B7F3A36-95A4-4D4E-A7A5-3CF8B9B2D9A1}"'))
    assert cfg.uuid == uuid.UUID("0b7f3a36-95a4-4d4e-a7a5-3cf8b9b2d9a1")


# -- devices -------------------------------------------------------------------------------------
DEVICES = '''
[devices.disk0]
model = "virtio-blk"
slot = 4
path = "disk.img"
ro = true
[devices.rng]
model = "virtio-rnd"
slot = "5:1"
[devices.auto]
model = "virtio-rnd"
'''


def test_devices_stay_tables_without_a_validator(tmp_path: Path) -> None:
    cfg = load_raw(machine(tmp_path, DEVICES))
    assert cfg.devices == {
        "disk0": {"model": "virtio-blk", "slot": 4, "path": "disk.img", "ro": True},
        "rng": {"model": "virtio-rnd", "slot": "5:1"},
        "auto": {"model": "virtio-rnd"},
    }
    text = machine(tmp_path, DEVICES).read_text()
    assert parse_machine(text, tmp_path / "m.toml").devices == cfg.devices


def test_devices_go_through_the_validator(tmp_path: Path) -> None:
    calls: list[tuple[Path, str, str, dict[str, Any]]] = []

    def validator(file: Path, prefix: str, dev_id: str, table: dict[str, Any]) -> object:
        calls.append((file, prefix, dev_id, dict(table)))
        return ("made", dev_id)

    checked: list[dict[str, Any]] = []
    f = machine(tmp_path, DEVICES)
    cfg = load_machine(f, validator, devices_checker=lambda file, d, taken: checked.append(d))
    assert cfg.devices == {"disk0": ("made", "disk0"), "rng": ("made", "rng"),
                           "auto": ("made", "auto")}
    assert [c[:3] for c in calls] == [(f, "devices.disk0", "disk0"), (f, "devices.rng", "rng"),
                                      (f, "devices.auto", "auto")]
    assert calls[0][3] == {"model": "virtio-blk", "slot": 4, "path": "disk.img", "ro": True}
    assert checked == [cfg.devices]


def test_validator_errors_pass_through(tmp_path: Path) -> None:
    def validator(file: Path, prefix: str, dev_id: str, table: dict[str, Any]) -> object:
        raise ConfigError(f"{file}: {prefix}.path: disk image does not exist (got \"x\")")

    f = machine(tmp_path, DEVICES)
    with pytest.raises(ConfigError, match=r"m\.toml: devices\.disk0\.path: disk image"):
        load_machine(f, validator)


def test_the_plugin_validator_places_devices(tmp_path: Path) -> None:
    cfg = load_machine(machine(tmp_path, '[devices.rng]\nmodel = "virtio-rnd"\nslot = 3\n'))
    placed = cfg.devices["rng"]
    assert (placed.type.name, placed.slot, placed.func) == ("virtio-rnd", 3, 0)


@pytest.mark.parametrize("a, b", [("3", "3"), ("3", '"3"'), ("3", '"3:0"'), ('"7:2"', '"7:2"')])
def test_slot_conflicts(tmp_path: Path, a: str, b: str) -> None:
    f = machine(tmp_path, f'[devices.a]\nmodel = "x"\nslot = {a}\n'
                          f'[devices.b]\nmodel = "x"\nslot = {b}\n')
    assert "devices.b.slot: slot " in error_of(f) and "is taken by devices.a" in error_of(f)


def test_functions_of_one_slot_do_not_conflict(tmp_path: Path) -> None:
    f = machine(tmp_path, '[devices.a]\nmodel = "x"\nslot = "6:0"\n'
                          '[devices.b]\nmodel = "x"\nslot = "6:1"\n'
                          '[devices.c]\nmodel = "x"\nslot = 0\n'
                          '[devices.d]\nmodel = "x"\nslot = "31:7"\n')
    assert list(load_raw(f).devices) == ["a", "b", "c", "d"]


# -- CPU features ------------------------------------------------------------------------------
REQUIRED_FEATURES = """fpu tsc msr pae apic sep mtrr pge cmov pat pse36 clflush mmx fxsr sse sse2
ht sse3 pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer
aes xsave avx f16c rdrand hypervisor fsgsbase bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f
rdseed adx smap clflushopt clwb sha_ni umip pku ospke gfni vaes vpclmulqdq rdpid fsrm xsaveopt
xsavec xsaves syscall nx pdpe1gb rdtscp lm lahf_lm abm sse4a xsaveerptr invtsc""".split()


def test_feature_table_has_every_required_name() -> None:
    assert set(REQUIRED_FEATURES) <= set(FEATURES)
    assert feature_names() == sorted(FEATURES)


def test_feature_table_is_well_formed() -> None:
    seen: dict[tuple[int, int, str, int], str] = {}
    for name, (leaf, subleaf, reg, bit) in FEATURES.items():
        assert reg in ("eax", "ebx", "ecx", "edx") and 0 <= bit <= 31 and subleaf >= 0, name
        where = (leaf, subleaf, reg, bit)
        if where in seen:
            assert ALIASES.get(name) == seen[where] or ALIASES.get(seen[where]) == name, name
        seen[where] = name


@pytest.mark.parametrize("name, where", [
    ("fpu", (1, 0, "edx", 0)), ("ht", (1, 0, "edx", 28)), ("sse3", (1, 0, "ecx", 0)),
    ("cx16", (1, 0, "ecx", 13)), ("x2apic", (1, 0, "ecx", 21)), ("xsave", (1, 0, "ecx", 26)),
    ("hypervisor", (1, 0, "ecx", 31)), ("fsgsbase", (7, 0, "ebx", 0)),
    ("smep", (7, 0, "ebx", 7)), ("invpcid", (7, 0, "ebx", 10)), ("smap", (7, 0, "ebx", 20)),
    ("sha_ni", (7, 0, "ebx", 29)), ("umip", (7, 0, "ecx", 2)), ("rdpid", (7, 0, "ecx", 22)),
    ("fsrm", (7, 0, "edx", 4)), ("xsaves", (0xD, 1, "eax", 3)),
    ("lahf_lm", (0x80000001, 0, "ecx", 0)), ("abm", (0x80000001, 0, "ecx", 5)),
    ("nx", (0x80000001, 0, "edx", 20)), ("rdtscp", (0x80000001, 0, "edx", 27)),
    ("lm", (0x80000001, 0, "edx", 29)), ("invtsc", (0x80000007, 0, "edx", 8)),
    ("xsaveerptr", (0x80000008, 0, "ebx", 2)),
])
def test_feature_bits(name: str, where: tuple[int, int, str, int]) -> None:
    assert FEATURES[name] == where


def test_compat_profile() -> None:
    off = """smap smep umip pku ospke fsgsbase rdpid rdrand rdseed avx avx2 avx512f popcnt rdtscp
    clflushopt clwb sha_ni aes pclmulqdq sse4_1 sse4_2 ssse3 movbe bmi1 bmi2 adx invpcid pcid
    fsrm f16c fma xsave xsaves xsavec xsaveopt gfni vaes vpclmulqdq cx16 hle rtm""".split()
    assert set(COMPAT_PROFILE) <= set(FEATURES)
    assert all(COMPAT_PROFILE[n] is False for n in off)
    assert COMPAT_PROFILE["xsaveerptr"] is True
    assert [n for n, on in COMPAT_PROFILE.items() if on] == ["xsaveerptr"]


def test_huge_pages_auto_true_false(tmp_path) -> None:
    from vmrun.config import load_machine

    (tmp_path / "vmlinux").write_bytes(KERNEL)
    for text, want in (("", None), ('huge_pages = "auto"\n', None), ("huge_pages = true\n", True),
                       ("huge_pages = false\n", False)):
        f = tmp_path / "m.toml"
        f.write_text(f'name = "m"\n{text}[boot]\nkernel = "vmlinux"\n')
        assert load_machine(f).huge_pages is want


# -- hostile machine files and inputs, through the command line (issue 10) ------------------
def vmrun_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmrun", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "500"})


def hostile(tmp_path: Path, kind: str) -> Path:
    """A bad machine file of ``kind`` in ``tmp_path``, next to a good kernel."""
    (tmp_path / "vmlinux").write_bytes(KERNEL)
    f = tmp_path / "m.toml"
    if kind == "fifo":
        os.mkfifo(f)
        return f
    if kind == "dev-zero":
        return Path("/dev/zero")
    if kind == "nested":
        f.write_text('name = "m"\nx = ' + "[" * 5000 + "]" * 5000 +
                     '\n[boot]\nkernel = "vmlinux"\n')
    elif kind == "memory-1T":
        f.write_text('name = "m"\nmemory = "1T"\n[boot]\nkernel = "vmlinux"\n')
    elif kind == "too-big":
        f.write_text('name = "m"\n' + "#" * (2 * MiB) + '\n[boot]\nkernel = "vmlinux"\n')
    elif kind == "kernel-fifo":
        os.mkfifo(tmp_path / "k")
        f.write_text('name = "m"\n[boot]\nkernel = "k"\n')
    elif kind == "uart-fifo":
        os.mkfifo(tmp_path / "u.log")
        f.write_text('name = "m"\n[boot]\nkernel = "vmlinux"\n[devices.u]\nmodel = "uart"\n'
                     'backend = "file"\npath = "u.log"\n')
    return f


EXPECTED = {
    "fifo": "cannot read machine file: it is a FIFO, not a regular file",
    "dev-zero": "/dev/zero: cannot read machine file: it is a character device",
    "nested": "line 2: TOML syntax: arrays or inline tables nested too deeply",
    "memory-1T": 'memory: is more than this host\'s RAM and swap',
    "too-big": "bytes (at most 1048576)",
    "kernel-fifo": "boot.kernel: kernel",
    "uart-fifo": "devices.u.path:",
}


@pytest.mark.parametrize("command", ["check", "up"])
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_hostile_inputs_are_one_line_exit_4_nothing_created(tmp_path: Path, command: str,
                                                           kind: str) -> None:
    f = hostile(tmp_path, kind)
    before = sorted(tmp_path.iterdir())
    out = vmrun_cli(command, str(f))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 4, out.stderr
    assert len(lines) == 1, out.stderr
    assert EXPECTED[kind] in lines[0] and str(f) in lines[0], lines[0]
    assert sorted(tmp_path.iterdir()) == before


def test_host_memory_is_ram_plus_swap() -> None:
    from vmrun.config import host_memory

    assert host_memory() is None or 64 * MiB < host_memory() < 1 << 50


def test_fifo_socket_and_unreadable_kernel_or_initrd(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    f = machine(tmp_path, '[boot]\nkernel = "fifo"\n')
    assert error_of(f).endswith('boot.kernel: kernel ' + str(tmp_path / "fifo") +
                                ' is a FIFO, not a regular file (got "fifo")')
    f = machine(tmp_path, '[boot]\nkernel = "vmlinux"\ninitrd = "fifo"\n')
    assert "boot.initrd: initrd " in error_of(f) and "is a FIFO" in error_of(f)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        f = machine(tmp_path, '[boot]\nkernel = "sock"\n')
        assert "boot.kernel: kernel " in error_of(f) and "is a socket" in error_of(f)


def test_initrd_limit_follows_the_boot_protocol(tmp_path: Path) -> None:
    from vmrun.core.boot import INITRD_TOP, initrd_limit

    assert initrd_limit(64 * MiB, 2 * MiB) == 62 * MiB
    assert initrd_limit(4 << 30, 2 * MiB) == INITRD_TOP - 2 * MiB
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as fd:
        fd.truncate(63 * MiB)          # sparse: more than 64M of RAM leaves above the kernel
    f = machine(tmp_path, 'memory = "64M"\n[boot]\nkernel = "vmlinux"\ninitrd = "initrd"\n')
    assert "boot.initrd: initrd " in error_of(f) and "does not fit" in error_of(f)
    f = machine(tmp_path, 'memory = "128M"\n[boot]\nkernel = "vmlinux"\ninitrd = "initrd"\n')
    assert load_raw(f).boot.initrd == initrd


def test_initrd_limit_follows_a_bzimages_initrd_addr_max(tmp_path: Path) -> None:
    """``check`` refuses what the loader would: an initrd above the kernel's own limit."""
    from vmrun.testing import kernels

    (tmp_path / "bzImage").write_bytes(kernels.bzimage(initrd_addr_max=0x00FF_FFFF))
    with open(tmp_path / "initrd", "wb") as fd:
        fd.truncate(20 * MiB)
    f = machine(tmp_path, 'memory = "256M"\n[boot]\nkernel = "bzImage"\ninitrd = "initrd"\n')
    assert "below the kernel's initrd_addr_max 0xffffff" in error_of(f)
    with open(tmp_path / "initrd", "wb") as fd:
        fd.truncate(8 * MiB)
    assert load_raw(f).boot.initrd == tmp_path / "initrd"


def test_serial_and_uart_outputs_that_would_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "out")
    f = machine(tmp_path, '[serial.com1]\nbackend = "file"\npath = "out"\n')
    assert "serial.com1.path: " in error_of(f) and "is a FIFO" in error_of(f)
    f = machine(tmp_path, '[devices.u]\nmodel = "uart"\nbackend = "file"\npath = "out"\n')
    with pytest.raises(ConfigError, match=r"devices\.u\.path: .* is a FIFO \(got \"out\"\)"):
        load_machine(f)


def test_one_image_through_a_hard_link(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(4096))
    os.link(tmp_path / "a.img", tmp_path / "b.img")
    f = machine(tmp_path, '[devices.a]\nmodel = "virtio-blk"\npath = "a.img"\n'
                          '[devices.b]\nmodel = "virtio-blk"\npath = "b.img"\n')
    with pytest.raises(ConfigError, match=r"devices\.b\.path: this file is already used by "
                                          r"devices\.a \(got"):
        load_machine(f)
    f = machine(tmp_path, '[serial.com1]\nbackend = "file"\npath = "a.img"\n'
                          '[serial.com2]\nbackend = "file"\npath = "b.img"\n')
    assert "serial.com2.path: serial.com1 already uses it" in error_of(f)


def test_read_only_image_used_read_write(tmp_path: Path) -> None:
    """A file the user cannot write (mode 0444; as root, where modes do not stop writes, the
    immutable attribute, which stops root too) is refused read-write, accepted with ro."""
    img = tmp_path / "ro.img"
    img.write_bytes(bytes(4096))
    img.chmod(0o444)
    immutable = False
    if os.access(img, os.W_OK):
        chattr = subprocess.run(["chattr", "+i", str(img)], capture_output=True)
        if chattr.returncode != 0:
            pytest.skip(f"root, and chattr +i fails here: {chattr.stderr.decode().strip()}")
        immutable = True
    try:
        f = machine(tmp_path, '[devices.a]\nmodel = "virtio-blk"\npath = "ro.img"\n')
        with pytest.raises(ConfigError, match="read-only"):
            load_machine(f)
        load_machine(machine(tmp_path, '[devices.a]\nmodel = "virtio-blk"\npath = "ro.img"\n'
                                       'ro = true\n'))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(img)], check=True)


def test_machine_file_limit_reads_at_most_limit_plus_one(tmp_path: Path) -> None:
    from vmrun.config import MAX_MACHINE_FILE

    f = tmp_path / "big.toml"
    f.write_text("#" * (MAX_MACHINE_FILE + 1))
    assert error_of(f) == f"{f}: machine file is {MAX_MACHINE_FILE + 1} bytes (at most " \
                          f"{MAX_MACHINE_FILE})"
    f.write_text('name = "m"\n' + "#" * (MAX_MACHINE_FILE - 200) + "\n")
    assert "boot: is required" in error_of(f)
