"""The plugin system: pluggy hooks, discovery through entry points, the device registry.

Discovery happens once per process (:func:`get_registry`). Built-ins are registered like
third-party plugins; each entry point is loaded on its own, so a broken plugin is reported by
name and the others still load. ``check_pending()`` makes a misspelt hook name fail loudly.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

from vmrun.plugins import hookspecs
from vmrun.plugins.registry import DeviceType

if TYPE_CHECKING:
    from vmrun.qmp.registry import QmpCommand

hookimpl = pluggy.HookimplMarker("vmrun")
log = logging.getLogger("vmrun.plugins")
ENTRY_POINT_GROUP = "vmrun"
BUILTIN_MODULES = ("vmrun.plugins.builtins", "vmrun.qmp.commands")


@dataclass
class Registry:
    pm: pluggy.PluginManager
    devices: dict[str, DeviceType] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)   # plugin name -> error
    dists: dict[str, tuple[str, str]] = field(default_factory=dict)  # plugin -> (dist, ver)
    qmp_commands: dict[str, QmpCommand] = field(default_factory=dict)

    def get(self, name: str) -> DeviceType | None:
        return self.devices.get(name)


_registry: Registry | None = None


def _vmrun_version() -> str:
    try:
        return importlib.metadata.version("vmrun")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def build_registry(entry_points: bool = True, extra: list[object] | None = None) -> Registry:
    pm = pluggy.PluginManager("vmrun")
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm)
    import importlib

    for name in BUILTIN_MODULES:
        pm.register(importlib.import_module(name), name=name)
    for plugin in extra or []:
        pm.register(plugin)
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                if ep.dist is not None:
                    reg.dists[ep.name] = (ep.dist.metadata["name"], ep.dist.version)
            except Exception as e:  # a broken plugin must not take the others down
                reg.broken[ep.name] = f"{type(e).__name__}: {e}"
                log.warning("plugin %s failed to load: %s", ep.name, reg.broken[ep.name])
    pm.check_pending()

    for impl in pm.hook.vmrun_register_devices.get_hookimpls():
        dist, version = reg.dists.get(impl.plugin_name,
                                      ("vmrun (built in)", _vmrun_version()))

        def register(dtype: DeviceType, _dist: str = dist, _ver: str = version,
                     _name: str = impl.plugin_name) -> None:
            if dtype.name in reg.devices:
                other = reg.devices[dtype.name]
                reg.broken[_name] = (f"registers {dtype.name!r}, which {other.plugin} already "
                                     "registered")
                return
            dtype.plugin, dtype.version = _dist, _ver
            reg.devices[dtype.name] = dtype

        try:
            impl.function(register=register)
        except Exception as e:
            reg.broken[impl.plugin_name] = f"{type(e).__name__}: {e}"
            log.warning("plugin %s failed to register devices: %s", impl.plugin_name, e)
    _collect_qmp_commands(pm, reg)
    return reg


def _collect_qmp_commands(pm: pluggy.PluginManager, reg: Registry) -> None:
    """The QMP commands of every plugin (built-ins first); a name taken twice, or a plugin
    whose hook raises, marks that plugin broken and the others still register."""
    from vmrun.qmp.registry import QmpCommand

    for impl in pm.hook.vmrun_qmp_commands.get_hookimpls():

        def register(cmd: QmpCommand, _name: str = impl.plugin_name) -> None:
            if not isinstance(cmd, QmpCommand):
                raise TypeError(f"register() takes a QmpCommand, not {type(cmd).__name__}")
            if cmd.name in reg.qmp_commands or cmd.name == "qmp_capabilities":
                other = reg.qmp_commands.get(cmd.name)
                reg.broken[_name] = (f"registers QMP command {cmd.name!r}, which "
                                     f"{other.plugin if other else 'the core'} already "
                                     "registered")
                return
            cmd.plugin = _name
            reg.qmp_commands[cmd.name] = cmd

        try:
            impl.function(register=register)
        except Exception as e:
            reg.broken[impl.plugin_name] = f"{type(e).__name__}: {e}"
            log.warning("plugin %s failed to register QMP commands: %s", impl.plugin_name, e)


def get_registry() -> Registry:
    global _registry
    if _registry is None:
        _registry = build_registry()
    return _registry
