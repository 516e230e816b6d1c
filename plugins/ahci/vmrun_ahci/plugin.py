"""Registers bhyve's AHCI emulations: ``ahci-hd`` and ``ahci-cd`` (a controller with one
port) and ``ahci`` (up to 32 ports: ``ports = [{type = "hd", path = "a.img"}, ...]``, bhyve's
``ahci,hd:a.img,cd:x.iso``). Each port takes the platform's block options
(:func:`vmrun.api.disk_options`), as virtio-blk does; a CD is read-only, and a CD without a
path is an empty drive."""

from __future__ import annotations

from typing import Any

from vmrun.api import (
    DeviceContext,
    DeviceType,
    Option,
    check_disk,
    disk_options,
    hookimpl,
    open_disk_from,
)
from vmrun_ahci.ata import AtaDisk, Drive, default_serial
from vmrun_ahci.atapi import AtapiCd
from vmrun_ahci.hba import MAX_PORTS, AhciHba

WORKERS = Option("workers", "int", "I/O worker threads per port", 8, min=1, max=64)


def _error(message: str, key: str) -> ValueError:
    e = ValueError(message)
    e.option = key   # type: ignore[attr-defined]
    return e


def _check_port(port: dict[str, Any], prefix: str = "") -> None:
    """One port's options, as the machine file is checked (``vmrun check`` too)."""
    kind = port.get("type", "hd")
    if kind == "hd" and port.get("path") is None:
        raise _error("a hd port needs a path", f"{prefix}path" if prefix else "")
    if kind == "cd":
        for key, default in (("size", None), ("sectorsize", "512"), ("discard", True)):
            if port.get(key, default) != default:
                raise _error(f"{key} does not apply to a CD (read-only, 2048-byte blocks)",
                             f"{prefix}{key}")
    check_disk(port, f"{prefix}path", read_only=kind == "cd")


def _drive(ctx: DeviceContext, port: dict[str, Any], index: int) -> Drive:
    serial = port.get("serial") or default_serial(f"{ctx.uuid}:{ctx.id}:{index}")
    if port.get("type", "hd") == "cd":
        backend = open_disk_from(port, ctx.created, read_only=True) \
            if port.get("path") is not None else None
        return AtapiCd(backend, serial=serial)
    return AtaDisk(open_disk_from(port, ctx.created), serial=serial)


def _controller(ctx: DeviceContext, ports: list[dict[str, Any]], workers: int) -> AhciHba:
    drives: list[Drive] = []
    try:
        for i, port in enumerate(ports):
            drives.append(_drive(ctx, port, i))
    except BaseException:
        for d in drives:
            d.close()
        raise
    return AhciHba(drives, workers=workers, name=f"ahci {ctx.id}")


PORT_FIELDS = (Option("type", "choice", "hd (a disk) or cd (a CD/DVD drive)", "hd",
                      choices=("hd", "cd")),
               *disk_options(path_required=False))


def _check_ports(opts: dict[str, Any]) -> None:
    for i, port in enumerate(opts["ports"]):
        _check_port(port, f"ports[{i}].")


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType(
        "ahci-hd", "AHCI SATA controller with one disk (ICH9, NCQ, TRIM)",
        lambda ctx, o: _controller(ctx, [dict(o, type="hd")], o["workers"]),
        [*disk_options(), WORKERS], exclusive_paths=("path",),
        check=lambda o: _check_port(dict(o, type="hd"))))
    register(DeviceType(
        "ahci-cd", "AHCI SATA controller with one CD/DVD drive (no path: an empty drive)",
        lambda ctx, o: _controller(ctx, [dict(o, type="cd")], o["workers"]),
        [*disk_options(path_required=False, media="cd"), WORKERS], exclusive_paths=("path",),
        check=lambda o: _check_port(dict(o, type="cd"))))
    register(DeviceType(
        "ahci", f"AHCI SATA controller with 1..{MAX_PORTS} ports of disks and CD drives",
        lambda ctx, o: _controller(ctx, o["ports"], o["workers"]),
        [Option("ports", "tables", "the ports, in order: {type = \"hd\" | \"cd\", path = ..., "
                "and the block options of ahci-hd}", required=True, min=1, max=MAX_PORTS,
                fields=PORT_FIELDS), WORKERS],
        exclusive_paths=("ports.path",), check=_check_ports))
