"""Registers ``virtio-blk`` with bhyve's options plus the xhyve fork's sparse/split images."""

from __future__ import annotations

import os
import stat
from typing import Any

from vmrun.api import (
    DeviceContext,
    DeviceType,
    Option,
    VirtioPciTransport,
    hookimpl,
    open_disk,
    parse_sectorsize,
)
from vmrun_virtio_blk.device import VirtioBlk


def _sectorsize(value: str) -> None:
    parse_sectorsize(value)


def _serial(value: str) -> None:
    if len(value.encode()) > 20:
        raise ValueError("must be at most 20 bytes")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))


def _path_error(message: str) -> ValueError:
    e = ValueError(message)
    e.option = "path"   # type: ignore[attr-defined]   # the error is on devices.ID.path
    return e


def _check(opts: dict[str, Any]) -> None:
    """What opening the image would trip over, found while the machine file is checked (so
    by ``vmrun check`` too): a raw image is a regular file (not empty) or a block device,
    readable, and writable unless ``ro = true``."""
    if opts["sparse"] or opts["split"]:
        return
    path = opts["path"]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if opts["size"] is None:
            raise _path_error(f"{path}: disk image does not exist (give size = \"...\" "
                              "to create it)") from None
        if not path.parent.is_dir():
            raise _path_error(f"{path}: directory {path.parent} does not exist") from None
        return
    except OSError as e:
        raise _path_error(f"{path}: {e.strerror}") from None
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise _path_error(f"{path}: disk image is {kind}, not a regular file or a "
                              "block device")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise _path_error(f"{path}: disk image is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise _path_error(f"{path}: disk image is not readable")
    if not opts["ro"] and not os.access(path, os.W_OK):
        raise _path_error(f"{path}: disk image is read-only (set ro = true to use it so)")


def _factory(ctx: DeviceContext, opts: dict[str, Any]):
    backend = open_disk(opts["path"], read_only=opts["ro"], nocache=opts["nocache"],
                        sync=opts["sync"], sector_size=parse_sectorsize(opts["sectorsize"]),
                        size=opts["size"], split=opts["split"], sparse=opts["sparse"],
                        discard=opts["discard"], created=ctx.created)
    return VirtioPciTransport(VirtioBlk(backend, serial=opts["serial"], workers=opts["workers"]))


OPTIONS = [
    Option("path", "path", "disk image: a raw file, a block device, a sparse/split image or "
           "a qcow2 image (found by its header)",
           required=True),
    Option("ro", "bool", "read-only: the guest sees a read-only disk, writes fail", False),
    Option("nocache", "bool", "open with O_DIRECT (bypass the host page cache)", False),
    Option("sync", "bool", "open with O_SYNC (every write reaches the disk)", False),
    Option("sectorsize", "str", "logical[/physical] sector size, e.g. \"4096\" or \"512/4096\"",
           "512", validate=_sectorsize),
    Option("serial", "str", "serial number the guest reads (GET_ID), up to 20 bytes", "",
           validate=_serial),
    Option("discard", "bool", "pass TRIM/DISCARD through (punch holes in the image)", True),
    Option("size", "size", "create the image with this size if it does not exist"),
    Option("split", "size", "split the image into segment files of this size (<path>.0000...)"),
    Option("sparse", "bool", "sparse image: only written sectors take space (<path>.lut)",
           False),
    Option("workers", "int", "I/O worker threads", 8, min=1, max=64),
]


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType("virtio-blk", "virtio block device (raw, sparse, split or qcow2 image)",
                        _factory, OPTIONS, exclusive_paths=("path",), check=_check))
