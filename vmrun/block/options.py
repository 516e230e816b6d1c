"""The options every disk emulation offers, declared once: virtio-blk's and AHCI's ports.

bhyve's block options (``ro``, ``nocache``, ``sync``, ``sectorsize``, ``serial``) plus
``discard``, ``size`` (create), ``base`` (create a qcow2 overlay of an image, a pulled
cloud image say) and the xhyve fork's ``sparse``/``split`` images. A plugin puts
:func:`disk_options` in its option list (or in the fields of a "tables" option, one table per
port), runs :func:`check_disk` from its ``check`` (so ``vmrun check`` finds what opening the
image would trip over) and opens the image with :func:`open_disk_from`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from vmrun.block.backend import BlockBackend, parse_sectorsize
from vmrun.block.image_tools import open_disk
from vmrun.errors import VmrunError
from vmrun.plugins.registry import Option

SERIAL_BYTES = 20      # virtio-blk's GET_ID and ATA's IDENTIFY serial are both 20 bytes


def _sectorsize(value: str) -> None:
    parse_sectorsize(value)


def _serial(value: str) -> None:
    if len(value.encode()) > SERIAL_BYTES:
        raise ValueError(f"must be at most {SERIAL_BYTES} bytes")


def disk_options(*, path_required: bool = True, media: str = "disk") -> list[Option]:
    """The block options, fresh objects each call. ``media = "cd"``: a read-only medium with
    2048-byte blocks, so no ``sectorsize``, ``discard`` or ``size``, and ``ro`` is implied."""
    path_help = ("disk image: a raw file, a block device, a sparse/split image or a qcow2 "
                 "image (found by its header)"
                 if media == "disk" else "CD image (ISO 9660 or any raw file); none: an "
                 "empty drive")
    opts = [
        Option("path", "path", path_help, required=path_required),
        Option("ro", "bool", "read-only: the guest sees a read-only disk, writes fail"
               if media == "disk" else "a CD is always read-only (accepted for symmetry)",
               False),
        Option("nocache", "bool", "open with O_DIRECT (bypass the host page cache)", False),
        Option("sync", "bool", "open with O_SYNC (every write reaches the disk)", False),
        Option("sectorsize", "str", "logical[/physical] sector size, e.g. \"4096\" or "
               "\"512/4096\"", "512", validate=_sectorsize),
        Option("serial", "str", f"serial number the guest reads, up to {SERIAL_BYTES} bytes",
               "", validate=_serial),
        Option("discard", "bool", "pass TRIM/DISCARD through (punch holes in the image)", True),
        Option("size", "size", "create the image with this size if it does not exist"),
        Option("split", "size", "split the image into segment files of this size "
               "(<path>.0000...)"),
        Option("sparse", "bool", "sparse image: only written sectors take space (<path>.lut)",
               False),
        Option("base", "path", "if path does not exist, create it as a qcow2 overlay of this "
               "image (grown to size), e.g. \"image:ubuntu-24.04/disk.qcow2\": the base is "
               "never written"),
    ]
    if media == "cd":
        opts = [o for o in opts if o.name not in ("sectorsize", "discard", "size", "base")]
    return opts


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))


def _path_error(message: str, key: str) -> ValueError:
    e = ValueError(message)
    e.option = key   # type: ignore[attr-defined]   # the error is on devices.ID.<key>
    return e


def check_disk(opts: dict[str, Any], key: str = "path", read_only: bool = False) -> None:
    """What opening the image would trip over, found while the machine file is checked: a
    raw image is a regular file (not empty) or a block device, readable, and writable unless
    read-only. ``key`` is where an error goes ("path", or "ports[2].path")."""
    path = opts.get("path")
    base = opts.get("base")
    if base is not None:
        _check_base(opts, key)
    if path is None or opts.get("sparse") or opts.get("split"):
        return
    read_only = read_only or opts.get("ro", False)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if base is not None:
            return                       # made at start: an overlay of base
        if opts.get("size") is None:
            raise _path_error(f"{path}: disk image does not exist"
                              + ("" if "size" not in opts else
                                 " (give size = \"...\" to create it)"), key) from None
        if not path.parent.is_dir():
            raise _path_error(f"{path}: directory {path.parent} does not exist", key) from None
        return
    except OSError as e:
        raise _path_error(f"{path}: {e.strerror}", key) from None
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise _path_error(f"{path}: disk image is {kind}, not a regular file or a "
                              "block device", key)
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise _path_error(f"{path}: disk image is empty (0 bytes)", key)
    if not os.access(path, os.R_OK):
        raise _path_error(f"{path}: disk image is not readable", key)
    if not read_only and not os.access(path, os.W_OK):
        raise _path_error(f"{path}: disk image is read-only (set ro = true to use it so)", key)


def _check_base(opts: dict[str, Any], key: str) -> None:
    """``base``: an existing image (a catalogue image is pulled by ``vmrun up`` first), for a
    writable qcow2 overlay, not together with the other ways of creating an image."""
    base = opts["base"]
    bkey = key.rsplit(".", 1)[0] + ".base" if "." in key else "base"
    for other in ("sparse", "split"):
        if opts.get(other):
            raise _path_error(f"base makes a qcow2 overlay; it cannot be {other}", bkey)
    if opts.get("ro"):
        raise _path_error("base makes a writable overlay; drop ro (or use the base itself "
                          "as path with ro = true)", bkey)
    if not os.path.exists(base):
        hint = ""
        if "/.cache/vmrun/images/" in str(base) or str(base).startswith(str(_cache_root())):
            name = Path(base).parent.name
            hint = f" (not pulled yet: run `vmrun image pull {name}`; vmrun up pulls it)"
        raise _path_error(f"{base}: base image does not exist{hint}", bkey)
    if opts.get("path") is not None and os.path.exists(opts["path"]) and \
            os.path.samefile(opts["path"], base):
        raise _path_error("path and base are the same file (the base is never written)", bkey)
    size = opts.get("size")
    if size is not None and not os.path.lexists(opts["path"]):
        try:
            with open_disk(base, read_only=True) as disk:
                base_size = disk.size
        except VmrunError as e:
            raise _path_error(str(e), bkey) from None
        if size < base_size:
            raise _path_error(f"size {size} is smaller than the base image ({base_size} "
                              "bytes): an overlay can only grow it", key.rsplit(".", 1)[0]
                              + ".size" if "." in key else "size")


def _cache_root() -> Path:
    from vmrun.image import cache_dir

    return cache_dir() / "images"


def open_disk_from(opts: dict[str, Any], created: list[Path] | None = None, *,
                   read_only: bool = False) -> BlockBackend:
    """Open (or create, with ``size``, or as a qcow2 overlay of ``base``) the image the parsed
    options describe."""
    path, base = opts["path"], opts.get("base")
    if base is not None and not os.path.lexists(path):
        from vmrun.block.image_tools import create_image

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # create_image builds under a temporary name and publishes whole, or leaves nothing.
        create_image(path, opts.get("size"), "qcow2", backing=Path(base).absolute())
        if created is not None:
            created.append(Path(path))
        opts = {**opts, "size": None}
    return open_disk(opts["path"], read_only=read_only or opts.get("ro", False),
                     nocache=opts.get("nocache", False), sync=opts.get("sync", False),
                     sector_size=parse_sectorsize(opts.get("sectorsize", "512")),
                     size=opts.get("size"), split=opts.get("split"),
                     sparse=opts.get("sparse", False), discard=opts.get("discard", True),
                     created=created)


__all__ = ["SERIAL_BYTES", "check_disk", "disk_options", "open_disk_from"]
