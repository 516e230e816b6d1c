"""Opening, creating and converting disk images (raw files and the sparse/split format).

Creation and conversion build the new image under a temporary name next to the destination and
only give it its real name(s) once it is complete and synced, so a failure or an interrupt
never leaves a half-written image behind, and an existing image is never overwritten.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vmrun.block.backend import BlockBackend
from vmrun.block.raw import RawFile
from vmrun.block.sparse import (
    SparseSplitDisk,
    check_geometry,
    create_sparse_split,
    image_files,
    is_split_image,
)
from vmrun.core.dma import CHUNK, is_zero
from vmrun.errors import VmrunError
from vmrun.units import parse_size as parse_size  # its home is vmrun.units; kept importable

FORMATS = ("raw", "sparse")
BLOCK = 4096  # hole granularity when copying: a host filesystem block

Progress = Callable[[int, int], None]


def image_exists(path: Path) -> bool:
    """Whether anything of an image (raw file, LUT or first segment) is at ``path``."""
    return path.exists() or is_split_image(path)


def open_disk(path: str | os.PathLike[str], *, read_only: bool = False, nocache: bool = False,
              sync: bool = False, sector_size: int | tuple[int, int] = 512,
              size: int | None = None, split: int | None = None,
              sparse: bool = False, discard: bool = True) -> BlockBackend:
    """Open (or, given ``size``, create) the image at ``path`` with the right backend.

    A path whose ``.lut`` or ``.0000`` exists, or a request for ``split``/``sparse``, means the
    sparse/split format; anything else is a raw file or block device.
    """
    path = Path(path)
    logical, physical = (sector_size, sector_size) if isinstance(sector_size, int) \
        else sector_size
    if sparse or split is not None or is_split_image(path):
        return SparseSplitDisk(path, size=size, split=split, sparse=sparse, sector_size=logical,
                               read_only=read_only, sync=sync, nocache=nocache,
                               discard=discard, physical_sector_size=physical)
    if size is not None and not read_only and not path.exists():
        _create_raw(path, size)
    disk = RawFile(path, read_only=read_only, nocache=nocache, sync=sync,
                   sector_size=(logical, physical), discard=discard)
    if size is not None and disk.size != size:
        disk.close()
        raise VmrunError(f"{path}: image is {disk.size} bytes but size={size}")
    return disk


def _create_raw(path: Path, size: int) -> None:
    """A raw image of ``size`` bytes as a sparse host file (no blocks until written)."""
    if size <= 0:
        raise VmrunError(f"{path}: size must be positive, not {size}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise VmrunError(f"{path}: already exists") from None
    except OSError as e:
        raise VmrunError(f"{path}: cannot create image: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise VmrunError(f"{path}: cannot create image: {e.strerror}") from None
    os.close(fd)


def _temp_base(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.tmp-{os.getpid()}")


def _refuse_existing(dst: Path) -> None:
    if image_exists(dst):
        raise VmrunError(f"{dst}: already exists (refusing to overwrite)")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise VmrunError(f"unknown image format {fmt!r} (expected one of {', '.join(FORMATS)})")


def _build(tmp: Path, size: int, fmt: str, split: int | None, sector_size: int) -> None:
    """Create the empty image under its temporary name."""
    if fmt == "raw" and split is None:
        _create_raw(tmp, size)
    else:
        create_sparse_split(tmp, size, split, fmt == "sparse", sector_size)


def _files(base: Path, fmt: str, split: int | None) -> list[Path]:
    if fmt == "raw" and split is None:
        return [base] if base.exists() else []
    return image_files(base)


def _rename_to(tmp_file: Path, tmp: Path, dst: Path) -> Path:
    """The final name of one file of the temporary image (same suffix, real base name)."""
    return dst.with_name(dst.name + tmp_file.name[len(tmp.name):])


def _publish(tmp: Path, dst: Path, fmt: str, split: int | None) -> None:
    """Give a finished image its real name(s); the LUT last, and never over an existing file."""
    files = _files(tmp, fmt, split)
    files.sort(key=lambda p: p.suffix == ".lut")
    done: list[Path] = []
    try:
        for f in files:
            target = _rename_to(f, tmp, dst)
            try:
                os.link(f, target)  # fails if target exists: no overwrite, even in a race
                f.unlink()
            except FileExistsError:
                raise VmrunError(f"{target}: already exists (refusing to overwrite)") from None
            except OSError:
                if target.exists():
                    raise VmrunError(f"{target}: already exists (refusing to overwrite)") \
                        from None
                os.rename(f, target)  # filesystems without hard links
            done.append(target)
    except BaseException:
        for target in done:
            target.unlink(missing_ok=True)
        raise
    _sync_dir(dst.parent)


def _sync_dir(directory: Path) -> None:
    """fsync the directory so the new names survive a host crash too."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard_temp(tmp: Path, fmt: str, split: int | None) -> None:
    for f in _files(tmp, fmt, split):
        f.unlink(missing_ok=True)


def create_image(path: str | os.PathLike[str], size: int, fmt: str = "raw",
                 split: int | None = None, sector_size: int = 512) -> None:
    """Create an empty image: ``raw`` (one sparse host file, or raw segments with ``split``)
    or ``sparse`` (LUT plus segments, one segment unless ``split``)."""
    dst = Path(path)
    _check_format(fmt)
    _refuse_existing(dst)
    if fmt == "raw" and split is None:
        if size <= 0:
            raise VmrunError(f"{dst}: size must be positive, not {size}")
    else:
        check_geometry(dst, size, split, fmt == "sparse", sector_size)
    tmp = _temp_base(dst)
    try:
        _build(tmp, size, fmt, split, sector_size)
        _publish(tmp, dst, fmt, split)
    finally:
        _discard_temp(tmp, fmt, split)


def convert_image(src: str | os.PathLike[str], dst: str | os.PathLike[str], dst_format: str,
                  split: int | None = None, sector_size: int | None = None,
                  progress: Progress | None = None, *, src_split: int | None = None,
                  src_sector_size: int = 512) -> None:
    """Copy ``src`` (any format) into a new image ``dst`` of ``dst_format``.

    Copies 1 MiB at a time and skips all-zero 4 KiB blocks, so a sparse destination only stores
    what the source really holds and a raw one stays a sparse host file. ``src_split`` and
    ``src_sector_size`` describe a sparse source the files alone cannot describe.
    ``progress(done, total)`` is called after each chunk.
    """
    src, dst = Path(src), Path(dst)
    _check_format(dst_format)
    _refuse_existing(dst)
    with open_disk(src, read_only=True, split=src_split, sector_size=src_sector_size) as source:
        total = source.size
        ss = sector_size or source.logical_sector_size
        if dst_format == "sparse" or split is not None:
            check_geometry(dst, total, split, dst_format == "sparse", ss)
        tmp = _temp_base(dst)
        try:
            _build(tmp, total, dst_format, split, ss)
            with open_disk(tmp, sector_size=ss, split=split,
                           sparse=dst_format == "sparse") as target:
                _copy(source, target, total, progress)
                target.flush()
            _publish(tmp, dst, dst_format, split)
        finally:
            _discard_temp(tmp, dst_format, split)


def _write_nonzero(target: BlockBackend, pos: int, chunk: memoryview) -> None:
    """Write only the runs of non-zero 4 KiB blocks, so zeros inside a chunk stay holes."""
    run = -1
    for at in range(0, len(chunk) + BLOCK, BLOCK):
        zero = at >= len(chunk) or is_zero([chunk[at:at + BLOCK]])
        if not zero and run < 0:
            run = at
        elif zero and run >= 0:
            target.writev(pos + run, [chunk[run:at]])
            run = -1


def _copy(source: BlockBackend, target: BlockBackend, total: int,
          progress: Progress | None) -> None:
    buf = memoryview(bytearray(CHUNK))
    pos = 0
    while pos < total:
        n = min(CHUNK, total - pos)
        chunk = buf[:n]
        source.readv(pos, [chunk])
        if not is_zero([chunk]):
            _write_nonzero(target, pos, chunk)
        pos += n
        if progress is not None:
            progress(pos, total)
    if progress is not None and total == 0:
        progress(0, 0)

