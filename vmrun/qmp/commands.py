"""The built-in QMP commands, registered through the same hook as a plugin's
(``vmrun_qmp_commands``). They drive ``ctx.control``, the run's control interface (the
:class:`~vmrun.runner.Runner`, or a fake in tests), which offers:

``cfg`` (the machine file), ``status()`` ("prelaunch", "running", "paused", "shutdown"),
``pause()`` / ``resume()`` (the vCPUs really stop), ``powerdown()`` (the ACPI power button),
``system_reset()``, ``quit(code, reason)``, ``machine`` (the current boot, or None).

Answers follow QEMU's shapes where one exists, so existing management tools read them.
"""

from __future__ import annotations

import struct
from typing import Any

from vmrun.core.exits import ExitCode
from vmrun.plugins import hookimpl
from vmrun.qmp.protocol import QmpError
from vmrun.qmp.registry import QmpCommand, QmpContext


def _machine(ctx: QmpContext) -> Any:
    m = ctx.machine
    if m is None:
        raise QmpError("the VM is not running (between boots or shutting down)")
    return m


def query_status(ctx: QmpContext) -> dict:
    status = ctx.control.status()
    return {"status": status, "running": status == "running", "singlestep": False}


def query_version(ctx: QmpContext) -> dict:
    from vmrun.qmp import version_info

    return version_info()


def query_name(ctx: QmpContext) -> dict:
    return {"name": ctx.control.cfg.name}


def query_uuid(ctx: QmpContext) -> dict:
    return {"UUID": str(ctx.control.cfg.uuid)}


def query_cpus_fast(ctx: QmpContext) -> list:
    m = _machine(ctx)
    out = []
    for vcpu in m.vm.vcpus:
        t = vcpu.thread
        out.append({"cpu-index": vcpu.index, "qom-path": f"/machine/unattached/cpu[{vcpu.index}]",
                    "thread-id": (t.native_id if t is not None and t.native_id else 0),
                    "target": "x86_64",
                    "props": {"core-id": 0, "thread-id": 0, "socket-id": vcpu.index,
                              "node-id": 0}})
    return out


def query_block(ctx: QmpContext) -> list:
    """One entry per disk: a device whose type declares exclusive ``path`` options (an image
    only it may open), or that answers ``qmp_block_info()`` itself (a removable drive)."""
    m = _machine(ctx)
    out = []
    for placed, dev in zip(m.placed, m.devices, strict=False):
        inner = getattr(dev, "device", dev)
        own = getattr(inner, "qmp_block_info", None) or getattr(dev, "qmp_block_info", None)
        if own is not None:
            info = own()
            if info is not None:
                out.append({"device": placed.id, "qdev": placed.id, **info})
            continue
        if "path" not in getattr(placed.type, "exclusive_paths", ()):
            continue
        path = placed.options.get("path")
        ro = bool(placed.options.get("ro", False))
        entry: dict[str, Any] = {"device": placed.id, "qdev": placed.id, "locked": False,
                                 "removable": False, "type": "unknown", "tray_open": False}
        if path is not None:
            entry["inserted"] = {"file": str(path), "ro": ro, "drv": "raw",
                                 "backing_file_depth": 0, "encrypted": False,
                                 "detect_zeroes": "off"}
        out.append(entry)
    return out


def _bar_regions(dev: Any) -> list[dict]:
    regions = []
    for bar in sorted(dev.bars, key=lambda b: b.index):
        addr = dev.config.bar_address(bar.index)
        region = {"bar": bar.index, "type": "io" if bar.kind == "io" else "memory",
                  "address": addr, "size": bar.size}
        if bar.kind != "io":
            region["prefetch"] = bool(bar.prefetchable)
            region["mem_type_64"] = bar.kind == "mem64"
        regions.append(region)
    return regions


def query_pci(ctx: QmpContext) -> list:
    m = _machine(ctx)
    ids = {(p.slot or 0, p.func): p.id for p in m.placed}
    devices = []
    for (slot, func), dev in sorted(m.pci.devices.items()):
        data = dev.config.data
        vendor, device = struct.unpack_from("<HH", data, 0)
        sub_vendor, sub = struct.unpack_from("<HH", data, 0x2C)
        entry: dict[str, Any] = {
            "bus": 0, "slot": slot, "function": func,
            "class_info": {"class": (dev.class_code >> 8) & 0xFFFF},
            "id": {"vendor": vendor, "device": device, "subsystem-vendor": sub_vendor,
                   "subsystem": sub},
            "qdev_id": ids.get((slot, func), ""),
            "regions": _bar_regions(dev),
        }
        if dev.interrupt_pin:
            entry["irq_pin"] = dev.interrupt_pin
            entry["irq"] = data[0x3C]
        devices.append(entry)
    return [{"bus": 0, "devices": devices}]


def query_commands(ctx: QmpContext) -> list:
    names = set(ctx.commands) | {"qmp_capabilities"}
    return [{"name": n} for n in sorted(names)]


def stop(ctx: QmpContext) -> None:
    ctx.control.pause()


def cont(ctx: QmpContext) -> None:
    ctx.control.resume()


def system_powerdown(ctx: QmpContext) -> None:
    ctx.control.powerdown()


def system_reset(ctx: QmpContext) -> None:
    ctx.control.system_reset()


def snapshot_save(ctx: QmpContext, file: str) -> dict:
    """vmrun's own: the whole machine into ``file`` (+ ``file.ram``), see vmrun.snapshot."""
    from pathlib import Path

    path = Path(file)
    if not path.is_absolute():
        raise QmpError("'file' must be an absolute path (the VM's working directory is "
                       "not yours)")
    return ctx.control.snapshot(path)


def quit_(ctx: QmpContext) -> None:
    control = ctx.control
    ctx.after_reply(lambda: control.quit(ExitCode.POWER_OFF, "quit (QMP)",
                                         shutdown_reason="host-qmp-quit"))


BUILTIN_COMMANDS = [
    QmpCommand("query-status", query_status, summary="run state"),
    QmpCommand("query-version", query_version, summary="vmrun's version (QEMU's shape)"),
    QmpCommand("query-name", query_name, summary="the machine file's name"),
    QmpCommand("query-uuid", query_uuid, summary="the machine's UUID"),
    QmpCommand("query-cpus-fast", query_cpus_fast, summary="vCPUs and their host threads"),
    QmpCommand("query-block", query_block, summary="disks"),
    QmpCommand("query-pci", query_pci, summary="PCI functions, their ids and BARs"),
    QmpCommand("query-commands", query_commands, summary="every command"),
    QmpCommand("stop", stop, summary="pause every vCPU"),
    QmpCommand("cont", cont, summary="resume the vCPUs"),
    QmpCommand("system_powerdown", system_powerdown, summary="press the ACPI power button"),
    QmpCommand("system_reset", system_reset, summary="reset the machine"),
    QmpCommand("quit", quit_, summary="end the VM now"),
    QmpCommand("x-vmrun-snapshot-save", snapshot_save, {"file": "str"},
               summary="save the machine to a snapshot file (vmrun up --restore)"),
]


@hookimpl
def vmrun_qmp_commands(register) -> None:
    for cmd in BUILTIN_COMMANDS:
        register(cmd)
