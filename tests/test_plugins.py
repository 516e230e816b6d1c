"""The plugin system: discovery through entry points, isolation of broken plugins, misspelt
hooks failing loudly, every hook documented, and device-table validation."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy
import pytest

from vmrun.config import ConfigError, parse_machine
from vmrun.plugins import build_registry, hookimpl, hookspecs
from vmrun.plugins.placement import place_devices

REPO = Path(__file__).resolve().parent.parent


def make_dist(root: Path, dist: str, module: str, body: str, version: str = "1.2.3") -> None:
    """A minimal installed distribution: a module and a dist-info with a vmrun entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[vmrun]\n{module} = {module}\n")


GOOD_PLUGIN = '''
from vmrun.core.pci import PciDevice
from vmrun.plugins import hookimpl
from vmrun.plugins.registry import DeviceType, Option

class Thing(PciDevice):
    vendor_id, device_id, class_code = 0x1234, 0x5678, 0xFF0000

@hookimpl
def vmrun_register_devices(register):
    register(DeviceType("thing", "a third-party test device", lambda ctx, o: Thing(),
                        [Option("speed", "int", "how fast", 3, min=1, max=9)]))
'''


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_register_like_plugins() -> None:
    reg = build_registry(entry_points=False)
    for name in ("hostbridge", "lpc", "uart", "virtio-rnd"):
        assert reg.devices[name].plugin == "vmrun (built in)"


def test_installed_plugin_is_discovered_with_its_distribution(plugin_path: Path) -> None:
    make_dist(plugin_path, "vmrun-thing", "vmrun_thing_plugin", GOOD_PLUGIN)
    reg = build_registry()
    thing = reg.devices["thing"]
    assert (thing.plugin, thing.version) == ("vmrun-thing", "1.2.3")
    assert "virtio-blk" in reg.devices     # the repository's own plugin, installed by make


def test_broken_plugin_is_named_and_does_not_take_others_down(plugin_path: Path) -> None:
    make_dist(plugin_path, "vmrun-thing", "vmrun_thing_plugin", GOOD_PLUGIN)
    make_dist(plugin_path, "vmrun-broken", "vmrun_broken_plugin", "raise RuntimeError('boom')\n")
    reg = build_registry()
    assert "thing" in reg.devices
    assert "boom" in reg.broken["vmrun_broken_plugin"]


def test_misspelt_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def vmrun_register_device(self, register):  # missing "s"
            pass

    with pytest.raises(pluggy.PluginValidationError):
        build_registry(entry_points=False, extra=[Typo()])


def test_every_hook_is_documented() -> None:
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if n.startswith("vmrun_")]
    assert set(hooks) == {"vmrun_register_devices", "vmrun_register_commands", "vmrun_dsdt",
                          "vmrun_qmp_commands"}
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert len(doc.split()) > 10, name


def test_every_hook_is_called_by_the_core() -> None:
    """A hook nobody calls is dead contract: each must be used somewhere in vmrun/."""
    source = "\n".join(p.read_text() for p in (REPO / "vmrun").rglob("*.py")
                       if p.name != "hookspecs.py")
    for name in ("vmrun_register_devices", "vmrun_register_commands", "vmrun_dsdt",
                 "vmrun_qmp_commands"):
        assert f"hook.{name}" in source or f"{name}.get_hookimpls" in source, name


def test_plugin_command_and_devices_listing(plugin_path: Path) -> None:
    make_dist(plugin_path, "vmrun-thing", "vmrun_thing_plugin", GOOD_PLUGIN)
    env_path = f"{plugin_path}"
    out = subprocess.run([sys.executable, "-m", "vmrun", "devices"], capture_output=True,
                         text=True, env={"PYTHONPATH": env_path, "COLUMNS": "200",
                                         "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "thing" in out.stdout and "vmrun-thing" in out.stdout
    out = subprocess.run([sys.executable, "-m", "vmrun", "devices", "thing"],
                         capture_output=True, text=True,
                         env={"PYTHONPATH": env_path, "COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert "speed" in out.stdout and "how fast" in out.stdout


def _machine(tmp_path: Path, devices: str) -> str:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    return f'name = "t"\n[boot]\nkernel = "{kernel}"\n{devices}'


def _load(tmp_path: Path, devices: str):
    from vmrun.plugins.placement import validate_device

    f = tmp_path / "m.toml"
    return parse_machine(_machine(tmp_path, devices), f, validate_device)


@pytest.mark.parametrize("devices, expected", [
    ('[devices.a]\nmodel = "nope"\n', "devices.a.model: no device emulation"),
    ('[devices.a]\nmodel = "virtio-rnd"\nrate = "fast"\n', "devices.a.rate: must be an integer"),
    ('[devices.a]\nmodel = "virtio-rnd"\ncolour = 1\n', "devices.a.colour: unknown option"),
    ('[devices.a]\nmodel = "virtio-blk"\n', "devices.a.path: required option"),
    ('[devices.a]\nmodel = "virtio-blk"\npath = "missing.img"\n', "disk image does not exist"),
    ('[devices.a]\nmodel = "virtio-rnd"\nslot = 40\n', "devices.a.slot: slot must be between"),
    ('[devices.a]\nmodel = "virtio-rnd"\nslot = 3\n[devices.b]\nmodel = "virtio-rnd"\n'
     'slot = 3\n', "devices.b.slot: slot 3:0 is taken by devices.a"),
    ('[devices.a]\nmodel = "lpc"\nslot = 5\n', "lpc always sits in slot 31"),
    ('[devices.a]\nmodel = "virtio-blk"\nsectorsize = "4096/512"\npath = "d.img"\n',
     "devices.a.sectorsize"),
    ('[devices.a]\nmodel = "uart"\nbackend = "file"\n', "backend file needs a path"),
])
def test_bad_device_tables(tmp_path: Path, devices: str, expected: str) -> None:
    (tmp_path / "d.img").write_bytes(bytes(4096))
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, devices)
    msg = str(e.value)
    assert expected in msg and msg.startswith(str(tmp_path / "m.toml")) and "\n" not in msg


def test_two_devices_on_one_image(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match="devices.b.path: this file is already used by devices.a"):
        _load(tmp_path, '[devices.a]\nmodel = "virtio-blk"\npath = "d.img"\n'
                        '[devices.b]\nmodel = "virtio-blk"\npath = "./d.img"\n')


def test_default_devices_and_auto_slots(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(bytes(4096))
    cfg = _load(tmp_path, '[devices.a]\nmodel = "virtio-blk"\npath = "d.img"\n'
                          '[devices.b]\nmodel = "virtio-rnd"\nslot = 1\n')
    placed = {d.id: (d.type.name, d.slot) for d in place_devices(cfg)}
    assert placed == {"hostbridge": ("hostbridge", 0), "lpc": ("lpc", 31),
                      "a": ("virtio-blk", 2), "b": ("virtio-rnd", 1)}
