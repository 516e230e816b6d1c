"""Registers ``virtio-blk`` with bhyve's options plus the xhyve fork's sparse/split images
(the block options are the platform's, :func:`vmrun.api.disk_options`, shared with AHCI)."""

from __future__ import annotations

from typing import Any

from vmrun.api import (
    DeviceContext,
    DeviceType,
    Option,
    VirtioPciTransport,
    check_disk,
    disk_options,
    hookimpl,
    open_disk_from,
)
from vmrun_virtio_blk.device import VirtioBlk


def _check(opts: dict[str, Any]) -> None:
    """What opening the image would trip over, found while the machine file is checked (so
    by ``vmrun check`` too): a raw image is a regular file (not empty) or a block device,
    readable, and writable unless ``ro = true``."""
    check_disk(opts)


def _factory(ctx: DeviceContext, opts: dict[str, Any]):
    backend = open_disk_from(opts, ctx.created)
    return VirtioPciTransport(VirtioBlk(backend, serial=opts["serial"], workers=opts["workers"]))


OPTIONS = [
    *disk_options(),
    Option("workers", "int", "I/O worker threads", 8, min=1, max=64),
]


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType("virtio-blk", "virtio block device (raw, sparse, split or qcow2 image)",
                        _factory, OPTIONS, exclusive_paths=("path",), check=_check))
