"""Opening, creating and converting disk images (raw files, the sparse/split format, qcow2).

Creation and conversion build the new image under a temporary name next to the destination and
only give it its real name(s) once it is complete and synced, so a failure or an interrupt
never leaves a half-written image behind, and an existing image is never overwritten.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vmrun.block.backend import BlockBackend, check_sector_sizes
from vmrun.block.qcow2 import Qcow2Image, is_qcow2
from vmrun.block.qcow2_check import (
    DEFAULT_CLUSTER,
    check_cluster_size,
    check_qcow2,
    create_qcow2,
    image_info,
)
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

FORMATS = ("raw", "sparse", "qcow2")
BLOCK = 4096  # hole granularity when copying: a host filesystem block

Progress = Callable[[int, int], None]
MAX_IMAGE_SIZE = (1 << 63) - 1  # what off_t can address


def image_exists(path: Path) -> bool:
    """Whether anything of an image (raw file, LUT or first segment) is at ``path``."""
    return path.exists() or is_split_image(path)


def open_disk(path: str | os.PathLike[str], *, read_only: bool = False, nocache: bool = False,
              sync: bool = False, sector_size: int | tuple[int, int] = 512,
              size: int | None = None, split: int | None = None,
              sparse: bool = False, discard: bool = True,
              created: list[Path] | None = None) -> BlockBackend:
    """Open (or, given ``size``, create) the image at ``path`` with the right backend.

    A path whose ``.lut`` or ``.0000`` exists, or a request for ``split``/``sparse``, means the
    sparse/split format; a file that starts with qcow2's magic is a qcow2 image (with its
    backing files); anything else is a raw file or block device.

    When this call creates the image, the paths of the files it created are appended to
    ``created`` (when given), so a caller whose later setup fails can take the new image away
    again with :func:`remove_created`. If opening fails after creating, the new files are
    removed here. An image that already existed is never recorded, nor removed.
    """
    path = Path(path)
    logical, physical = (sector_size, sector_size) if isinstance(sector_size, int) \
        else sector_size
    if sparse or split is not None or is_split_image(path):
        existed = is_split_image(path)
        try:
            disk: BlockBackend = SparseSplitDisk(
                path, size=size, split=split, sparse=sparse, sector_size=logical,
                read_only=read_only, sync=sync, nocache=nocache, discard=discard,
                physical_sector_size=physical)
        except BaseException:
            if not existed:
                remove_created(image_files(path))
            raise
        if not existed and created is not None:
            created.extend(image_files(path))
        return disk
    if is_qcow2(path):
        disk = Qcow2Image(path, read_only=read_only, nocache=nocache, sync=sync,
                          sector_size=(logical, physical), discard=discard)
        if size is not None and disk.size != size:
            disk.close()
            raise VmrunError(f"{path}: image is {disk.size} bytes but size={size}")
        return disk
    made = False
    if size is not None and not read_only and not os.path.lexists(path):
        _create_raw(path, size)
        made = True
    try:
        disk = RawFile(path, read_only=read_only, nocache=nocache, sync=sync,
                       sector_size=(logical, physical), discard=discard)
        if size is not None and disk.size != size:
            disk.close()
            raise VmrunError(f"{path}: image is {disk.size} bytes but size={size}")
    except BaseException:
        if made:
            remove_created([path])
        raise
    if made and created is not None:
        created.append(path)
    return disk


def remove_created(paths: list[Path]) -> None:
    """Delete the files :func:`open_disk` recorded in ``created`` (close the disk first);
    missing ones are skipped, and the list is emptied so a second call does nothing."""
    for p in list(paths):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:
            continue
    if isinstance(paths, list):
        paths.clear()


@contextmanager
def disk_being_created() -> Iterator[list[Path]]:
    """``with disk_being_created() as created: open_disk(..., created=created); ...`` removes
    whatever image the block created when the block raises (and keeps it when it does not).
    Close the backend before the block ends with an error: the files are unlinked either way,
    but a still-open descriptor keeps the space until it is closed."""
    created: list[Path] = []
    try:
        yield created
    except BaseException:
        remove_created(created)
        raise


def check_size(path: Path, size: object, sector_size: int = 512) -> int:
    """A new image's size: an int, positive, at most 2**63 - 1 and whole sectors."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise VmrunError(f"{path}: size {size!r} is not a whole number of bytes")
    if size <= 0:
        raise VmrunError(f"{path}: size must be positive, not {size}")
    if size > MAX_IMAGE_SIZE:
        raise VmrunError(f"{path}: size {size} is larger than the largest possible file "
                         f"({MAX_IMAGE_SIZE} bytes)")
    if size % sector_size:
        raise VmrunError(f"{path}: size {size} is not a multiple of the sector size "
                         f"{sector_size}")
    return size


def _create_raw(path: Path, size: int) -> None:
    """A raw image of ``size`` bytes as a sparse host file (no blocks until written)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise VmrunError(f"{path}: size must be positive, not {size!r}")
    if size > MAX_IMAGE_SIZE:
        raise VmrunError(f"{path}: size {size} is larger than the largest possible file "
                         f"({MAX_IMAGE_SIZE} bytes)")
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


def _build(tmp: Path, size: int, fmt: str, split: int | None, sector_size: int,
           cluster_size: int | None = None, backing: tuple[str, str] | None = None) -> None:
    """Create the empty image under its temporary name."""
    if fmt == "qcow2":
        create_qcow2(tmp, size, cluster_size=cluster_size or DEFAULT_CLUSTER,
                     backing=backing[0] if backing else None,
                     backing_format=backing[1] if backing else None)
    elif fmt == "raw" and split is None:
        _create_raw(tmp, size)
    else:
        create_sparse_split(tmp, size, split, fmt == "sparse", sector_size)


def _files(base: Path, fmt: str, split: int | None) -> list[Path]:
    if fmt == "qcow2" or (fmt == "raw" and split is None):
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


def create_image(path: str | os.PathLike[str], size: int | None, fmt: str = "raw",
                 split: int | None = None, sector_size: int = 512, *,
                 backing: str | os.PathLike[str] | None = None,
                 cluster_size: int | None = None) -> None:
    """Create an empty image: ``raw`` (one sparse host file, or raw segments with ``split``),
    ``sparse`` (LUT plus segments, one segment unless ``split``) or ``qcow2`` (optionally an
    overlay of ``backing``: a relative name is, as QEMU has it, relative to the new image's
    folder; ``size`` defaults to the backing file's)."""
    dst = Path(path)
    _check_format(fmt)
    back: tuple[str, str] | None = None
    if fmt != "qcow2" and (backing is not None or cluster_size is not None):
        raise VmrunError(f"{dst}: --backing and --cluster-size are for qcow2 images")
    if fmt == "qcow2":
        if split is not None:
            raise VmrunError(f"{dst}: a qcow2 image cannot be split")
        if cluster_size is not None:
            check_cluster_size(dst, cluster_size)
        if backing is not None:
            name = os.fspath(backing)
            bpath = Path(name) if os.path.isabs(name) else dst.parent / name
            with open_disk(bpath, read_only=True) as base:
                bsize = base.size
                bfmt = "qcow2" if isinstance(base, Qcow2Image) else "raw"
                if isinstance(base, SparseSplitDisk):
                    raise VmrunError(f"{bpath}: a backing file must be raw or qcow2")
            back = (name, bfmt)
            if size is None:
                size = bsize
    if size is None:
        raise VmrunError(f"{dst}: give the size of the new image (--size)")
    try:
        check_sector_sizes(sector_size, sector_size)
    except ValueError as e:
        raise VmrunError(f"{dst}: {e}") from None
    check_size(dst, size, sector_size)
    if split is not None:
        check_size(dst, split, sector_size)
    _refuse_existing(dst)
    if fmt == "sparse" or (fmt == "raw" and split is not None):
        check_geometry(dst, size, split, fmt == "sparse", sector_size)
    tmp = _temp_base(dst)
    with _signals_raise(dst):
        try:
            _build(tmp, size, fmt, split, sector_size, cluster_size, back)
            _publish(tmp, dst, fmt, split)
        finally:
            _discard_temp(tmp, fmt, split)


@contextmanager
def _signals_raise(dst: Path) -> Iterator[None]:
    """While an image is being written, SIGTERM (and SIGHUP) raise, like SIGINT does, so the
    ``finally`` that removes the temporary files runs instead of the process just dying."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise VmrunError(f"{dst}: interrupted by {signal.Signals(signum).name}; "
                         "nothing was written")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def convert_image(src: str | os.PathLike[str], dst: str | os.PathLike[str], dst_format: str,
                  split: int | None = None, sector_size: int | None = None,
                  progress: Progress | None = None, *, src_split: int | None = None,
                  src_sector_size: int = 512, cluster_size: int | None = None) -> None:
    """Copy ``src`` (any format) into a new image ``dst`` of ``dst_format``.

    Copies 1 MiB at a time and skips all-zero 4 KiB blocks, so a sparse destination only stores
    what the source really holds and a raw one stays a sparse host file. ``src_split`` and
    ``src_sector_size`` describe a sparse source the files alone cannot describe.
    ``progress(done, total)`` is called after each chunk.
    """
    src, dst = Path(src), Path(dst)
    _check_format(dst_format)
    if dst_format == "qcow2" and split is not None:
        raise VmrunError(f"{dst}: a qcow2 image cannot be split")
    if dst_format != "qcow2" and cluster_size is not None:
        raise VmrunError(f"{dst}: --cluster-size is for qcow2 images")
    if cluster_size is not None:
        check_cluster_size(dst, cluster_size)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise VmrunError(f"{dst}: is the source image (refusing to overwrite)")
    _refuse_existing(dst)
    with _signals_raise(dst), open_disk(src, read_only=True, split=src_split,
                                        sector_size=src_sector_size) as source:
        total = source.size
        ss = sector_size or source.logical_sector_size
        try:
            check_sector_sizes(ss, ss)
        except ValueError as e:
            raise VmrunError(f"{dst}: {e}") from None
        if dst_format == "sparse" or split is not None:
            check_geometry(dst, total, split, dst_format == "sparse", ss)
        tmp = _temp_base(dst)
        try:
            if dst_format == "qcow2" and total % 512:
                raise VmrunError(f"{dst}: a qcow2 image's size must be a multiple of 512 "
                                 f"({src} is {total} bytes)")
            _build(tmp, total, dst_format, split, ss, cluster_size)
            with open_disk(tmp, sector_size=ss, split=split,
                           sparse=dst_format == "sparse") as target:
                _copy(source, target, total, progress, src, dst)
                try:
                    target.flush()
                except OSError as e:
                    raise VmrunError(f"{dst}: cannot write: {e.strerror or e}") from None
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
          progress: Progress | None, src: Path = Path("source"),
          dst: Path = Path("destination")) -> None:
    buf = memoryview(bytearray(CHUNK))
    pos = 0
    while pos < total:
        n = min(CHUNK, total - pos)
        chunk = buf[:n]
        try:
            source.readv(pos, [chunk])
        except OSError as e:
            raise VmrunError(f"{src}: cannot read at byte {pos}: {e.strerror or e}") from None
        if not is_zero([chunk]):
            try:
                _write_nonzero(target, pos, chunk)
            except OSError as e:
                raise VmrunError(f"{dst}: cannot write at byte {pos}: {e.strerror or e}") \
                    from None
        pos += n
        if progress is not None:
            progress(pos, total)
    if progress is not None and total == 0:
        progress(0, 0)



def check_image(path: str | os.PathLike[str], split: int | None = None,
                sectorsize: int = 512) -> list[str]:
    """Every problem found with the image at ``path``, one line each; empty when it is sound.

    Opens the image read-only (a shared lock: a running VM holding it shows as "in use") with
    the checks :func:`open_disk` makes (file types, symlinked parts, segment sizes and count,
    the LUT's length), then scans the whole LUT of a sparse image: entries past their
    segment's data and slots shared by two sectors (at most 20 lines, then a count).
    """
    path = Path(path)
    disk: BlockBackend
    if split is None and not is_split_image(path) and is_qcow2(path):
        return check_qcow2(path)
    try:
        if split is not None or is_split_image(path):
            disk = SparseSplitDisk(path, split=split, sector_size=sectorsize, read_only=True,
                                   verify=False)
        elif os.path.lexists(path):
            disk = RawFile(path, read_only=True, sector_size=(sectorsize, sectorsize),
                           discard=False)
        else:
            return [f"{path}: no such disk image"]
    except VmrunError as e:
        return [str(e)]
    except OSError as e:
        return [f"{path}: {e.strerror or e}"]
    try:
        return disk.problems() if isinstance(disk, SparseSplitDisk) else []
    finally:
        disk.close()


def info_lines(path: str | os.PathLike[str], split: int | None = None,
               sectorsize: int = 512) -> list[str]:
    """What ``vmrun image info`` prints: format, virtual size, and for qcow2 the cluster size,
    the backing chain and how much is allocated."""
    path = Path(path)
    with open_disk(path, read_only=True, split=split, sector_size=sectorsize) as disk:
        lines = [f"image: {path}"]
        if isinstance(disk, Qcow2Image):
            info = image_info(disk)
            lines.append(f"format: {info['format']}")
            lines.append(f"virtual size: {_human(disk.size)} ({disk.size} bytes)")
            lines.append(f"cluster size: {disk.cluster_size}")
            lines.append(f"allocated: {_human(info['allocated'])} ({info['allocated']} bytes "
                         f"in {info['allocated'] // disk.cluster_size} clusters"
                         + (f", {info['compressed clusters']} compressed clusters"
                            if info["compressed clusters"] else "")
                         + (f", {info['zero clusters']} zero clusters"
                            if info["zero clusters"] else "") + ")")
            lines.append(f"disk size: {_human(info['disk size'])}")
            if disk.nb_snapshots:
                lines.append(f"internal snapshots: {disk.nb_snapshots}")
            chain = info["backing chain"]
            if chain:
                lines.append(f"backing file: {disk.backing_name}")
                for depth, (p, fmt) in enumerate(chain, start=1):
                    lines.append(f"backing chain {depth}: {p} ({fmt})")
            return lines
        if isinstance(disk, SparseSplitDisk):
            lines.append(f"format: {'sparse' if disk.sparse else 'split'}"
                         f" (split {disk.split}, sector size {disk.sector_size})")
            used = sum(os.stat(f).st_blocks * 512 for f in image_files(path))
        else:
            lines.append("format: raw")
            used = os.stat(path).st_blocks * 512
        lines.append(f"virtual size: {_human(disk.size)} ({disk.size} bytes)")
        lines.append(f"disk size: {_human(used)}")
        return lines


def _human(n: object) -> str:
    value = float(n)  # type: ignore[arg-type]
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
