"""The sparse/split image format of the xhyve fork (``size=20G,split=1G,sparse,sectorsize=4096``).

Files, for an image named ``PATH``:

* ``PATH.0000``, ``PATH.0001``, ...: the disk cut into segments of ``split`` bytes (the last
  one may be shorter). Without ``split`` there is one segment covering the whole disk.
* ``PATH.lut`` (``sparse`` only): one little-endian uint32 per logical sector of the whole
  disk. ``0xFFFFFFFF`` means never written (reads as zeros); any other ``N`` means the sector's
  data is at byte ``N * sectorsize`` of its segment file (segment = byte offset // split).

Split without sparse: each segment is a plain raw file of its full length (a sparse host file,
made with ftruncate), handled by :class:`~vmrun.block.raw.RawFile`.

Sparse: the first non-zero write to a sector appends the sector to its segment file, makes that
durable (fdatasync), and only then stores the LUT entry and syncs it, so a crash can never
leave an entry pointing at data that is not there; at worst an appended sector is orphaned.
All-zero writes to unwritten sectors allocate nothing. Later writes go in place.

Discard (and write-zeroes with unmap) marks whole sectors unwritten again (entry back to
0xFFFFFFFF): they read as zeros at once, but the space in the segment file is not reclaimed
(the format has no free list); a later write appends afresh.

Geometry is read from the files when the image exists. The LUT gives the size (entries x
sectorsize, so ``sector_size`` must be the one the image was made with); for a sparse image of
more than one segment the split cannot be recovered from the files and must be given.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import re
import sys
import threading
from pathlib import Path

from vmrun.block.backend import (
    BlockBackend,
    check_range,
    check_sector_sizes,
    preadv_full,
    pwritev_full,
    write_zeros,
)
from vmrun.block.raw import RawFile, lock_image, open_image_file
from vmrun.core.dma import (
    BufferCursor,
    Buffers,
    buffers_len,
    copy_in,
    copy_out,
    is_zero,
    zero_fill,
)
from vmrun.errors import VmrunError

FREE = 0xFFFFFFFF
MAX_SEGMENTS = 10000  # four-digit suffixes
PAGE = mmap.PAGESIZE


def segment_path(base: Path, index: int) -> Path:
    return base.with_name(f"{base.name}.{index:04d}")


def lut_path(base: Path) -> Path:
    return base.with_name(f"{base.name}.lut")


def is_split_image(base: Path) -> bool:
    """A path names a sparse/split image when its LUT or first segment exists."""
    return lut_path(base).exists() or segment_path(base, 0).exists()


def image_files(base: Path) -> list[Path]:
    """The files that make up the image at ``base`` (LUT first, then the segments in order)."""
    files = [lut_path(base)] if lut_path(base).exists() else []
    i = 0
    while i < MAX_SEGMENTS and segment_path(base, i).exists():
        files.append(segment_path(base, i))
        i += 1
    return files


def missing_segment(base: Path, count: int) -> Path | None:
    """The first missing segment when a higher-numbered one exists (a gap in the files)."""
    pattern = re.compile(re.escape(base.name) + r"\.(\d{4})")
    try:
        names = os.listdir(base.parent)
    except OSError:
        return None
    higher = [int(m.group(1)) for n in names if (m := pattern.fullmatch(n))]
    return segment_path(base, count) if any(i > count for i in higher) else None


def check_geometry(base: Path, size: int, split: int | None, sparse: bool,
                   sector_size: int) -> int:
    """Validate a new image's geometry; returns the split (the whole disk when not given)."""
    try:
        check_sector_sizes(sector_size, sector_size)
    except ValueError as e:
        raise VmrunError(f"{base}: {e}") from None
    if split is None:
        if not sparse:
            raise VmrunError(f"{base}: a split image needs split=, a sparse one sparse")
        split = size
    if size <= 0 or size % sector_size:
        raise VmrunError(f"{base}: size {size} must be a positive multiple of the sector size "
                         f"{sector_size}")
    if split <= 0 or split % sector_size:
        raise VmrunError(f"{base}: split {split} must be a positive multiple of the sector size "
                         f"{sector_size}")
    if split // sector_size >= FREE:
        raise VmrunError(f"{base}: split {split} holds too many sectors for the LUT")
    if -(-size // split) > MAX_SEGMENTS:
        raise VmrunError(f"{base}: size / split needs more than {MAX_SEGMENTS} segment files")
    return split


def create_sparse_split(base: Path, size: int, split: int | None, sparse: bool,
                        sector_size: int = 512) -> None:
    """Create the files of a new image: empty or full-length segments, and an all-free LUT."""
    split = check_geometry(base, size, split, sparse, sector_size)
    if is_split_image(base):
        raise VmrunError(f"{base}: image already exists")
    created: list[Path] = []
    try:
        for i in range(-(-size // split)):
            path = segment_path(base, i)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            created.append(path)
            try:
                if not sparse:
                    os.ftruncate(fd, min(split, size - i * split))
            finally:
                os.close(fd)
        if sparse:
            path = lut_path(base)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            created.append(path)
            try:
                left = size // sector_size * 4
                block = b"\xff" * (1 << 20)
                while left:
                    left -= os.write(fd, block[:min(left, len(block))])
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        for path in created:
            path.unlink(missing_ok=True)
        raise VmrunError(f"{base}: cannot create image: {e.strerror}") from None


class SparseSplitDisk(BlockBackend):
    """A split and/or sparse image (see the module docstring for the format)."""

    def __init__(self, path: str | os.PathLike[str], size: int | None = None,
                 split: int | None = None, sparse: bool = False, sector_size: int = 512,
                 read_only: bool = False, sync: bool = False, nocache: bool = False,
                 discard: bool = True, physical_sector_size: int | None = None,
                 verify: bool = True) -> None:
        """``verify=False`` skips the full LUT scan at open (:meth:`problems` does it later)."""
        self.base = Path(path)
        self._verify = verify
        self.read_only = read_only
        self.sector_size = sector_size
        self.logical_sector_size = sector_size
        self.physical_sector_size = max(physical_sector_size or sector_size, sector_size)
        self._discard = discard
        self._raw: list[RawFile] = []
        self._seg_fds: list[int] = []
        self._lut_fd = -1
        self._lut_map: mmap.mmap | None = None
        self._lut: memoryview | None = None
        if not is_split_image(self.base):
            if size is None:
                raise VmrunError(f"{self.base}: no such disk image (give size= to create it)")
            if read_only:
                raise VmrunError(f"{self.base}: no such disk image (not created read-only)")
            create_sparse_split(self.base, size, split, sparse, sector_size)
        try:
            if lut_path(self.base).exists():
                if nocache:
                    raise VmrunError(f"{self.base}: nocache is not supported for sparse images")
                self._open_sparse(size, split, sync)
            else:
                if sparse:
                    raise VmrunError(f"{lut_path(self.base)}: missing (the image is split, "
                                     "not sparse)")
                self._open_split(size, split, sync, nocache)
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------

    def _segments(self) -> list[Path]:
        paths = [p for p in image_files(self.base) if p != lut_path(self.base)]
        if not paths:
            raise VmrunError(f"{segment_path(self.base, 0)}: no such segment file")
        gap = missing_segment(self.base, len(paths))
        if gap is not None:
            raise VmrunError(f"{gap}: no such segment file, but higher-numbered segments exist "
                             "(incomplete image)")
        return paths

    def _open_split(self, size: int | None, split: int | None, sync: bool,
                    nocache: bool) -> None:
        """Plain split image: segments are raw files, all ``split`` long but the last."""
        self.sparse = False
        paths = self._segments()
        for p in paths:
            self._raw.append(RawFile(p, read_only=self.read_only, nocache=nocache, sync=sync,
                                     sector_size=(self.sector_size, self.sector_size),
                                     image_part=True))
        lengths = [r.size for r in self._raw]
        self.split = lengths[0] if split is None else split
        if self.split <= 0 or self.split % self.sector_size:
            raise VmrunError(f"{self.base}: split {self.split} must be a positive multiple of "
                             f"the sector size {self.sector_size}")
        for p, n in zip(paths, lengths, strict=True):
            last = p == paths[-1]
            if n > self.split or (not last and n != self.split) or n == 0:
                raise VmrunError(f"{p}: segment is {n} bytes, expected "
                                 f"{'at most ' if last else ''}{self.split} (split=)")
        self.size = sum(lengths)
        if size is not None and size != self.size:
            raise VmrunError(f"{self.base}: image is {self.size} bytes but size={size}")
        self.supports_discard = self._discard and all(r.supports_discard for r in self._raw)

    def _open_sparse(self, size: int | None, split: int | None, sync: bool) -> None:
        """Sparse image: map the LUT, open the segments, find each one's next free slot."""
        self.sparse = True
        if sys.byteorder != "little":
            raise VmrunError(f"{self.base}: sparse images need a little-endian host")
        ss = self.sector_size
        try:
            check_sector_sizes(ss, ss)
        except ValueError as e:
            raise VmrunError(f"{self.base}: {e}") from None
        lut = lut_path(self.base)
        flags = os.O_RDONLY if self.read_only else os.O_RDWR
        self._lut_fd = open_image_file(lut, flags, "LUT file", allow_block=False,
                                       nofollow=True)
        lock_image(self._lut_fd, self.base, self.read_only)
        length = os.fstat(self._lut_fd).st_size
        if length == 0 or length % 4:
            raise VmrunError(f"{lut}: {length} bytes is not a whole number of 4-byte entries "
                             "(corrupt LUT)")
        self.size = length // 4 * ss
        if size is not None and size != self.size:
            raise VmrunError(f"{lut}: has {length // 4} entries ({self.size} bytes at sectorsize "
                             f"{ss}) but size={size}")
        paths = self._segments()
        if split is None:
            if len(paths) > 1:
                raise VmrunError(f"{self.base}: sparse image has {len(paths)} segment files; "
                                 "give split= (the segment size it was created with)")
            split = self.size
        self.split = check_geometry(self.base, self.size, split, True, ss)
        expected = -(-self.size // self.split)
        if len(paths) != expected:
            raise VmrunError(f"{self.base}: has {len(paths)} segment files but size {self.size} "
                             f"with split {self.split} needs {expected}")
        self._split_sectors = self.split // ss
        seg_flags = flags | (os.O_SYNC if sync else 0)
        for p in paths:
            fd = open_image_file(p, seg_flags, "segment file", allow_block=False, nofollow=True)
            self._seg_fds.append(fd)
            # Every file of the image is locked, so no part of it can be opened on its own.
            lock_image(fd, p, self.read_only)
        lengths = [os.fstat(fd).st_size for fd in self._seg_fds]
        # Whole sectors of data per segment: a LUT entry must point below this.
        self._data_sectors = [n // ss for n in lengths]
        # Next append slot per segment. A crash mid-append can leave a partial sector at the
        # end; rounding up skips it (nothing may point there).
        self._next = [-(-n // ss) for n in lengths]
        access = mmap.ACCESS_READ if self.read_only else mmap.ACCESS_WRITE
        self._lut_map = mmap.mmap(self._lut_fd, length, access=access)
        # Entries are read and stored one aligned 4-byte word at a time through this view, so a
        # reader on another thread never sees half an update.
        self._lut = memoryview(self._lut_map).cast("I")
        self._alloc_locks = [threading.Lock() for _ in paths]
        self._rmw_lock = threading.Lock()
        self._dirty_lock = threading.Lock()
        self._dirty: set[int] = set()
        self.supports_discard = self._discard and not self.read_only
        if self._verify:
            bad = self.problems(limit=1)
            if bad:
                raise VmrunError(bad[0])

    # -- data path ---------------------------------------------------------------------

    def readv(self, offset: int, bufs: Buffers) -> int:
        total = buffers_len(bufs)
        check_range(self.base, offset, total, self.size)
        cur = BufferCursor(bufs)
        if self.sparse:
            self._sparse_io(offset, total, cur, write=False)
        else:
            for seg, off, n in self._pieces(offset, total):
                self._raw[seg].readv(off, cur.take(n))
        return total

    def writev(self, offset: int, bufs: Buffers) -> int:
        self._check_writable()
        total = buffers_len(bufs)
        check_range(self.base, offset, total, self.size)
        cur = BufferCursor(bufs)
        if self.sparse:
            self._sparse_io(offset, total, cur, write=True)
        else:
            for seg, off, n in self._pieces(offset, total):
                self._raw[seg].writev(off, cur.take(n))
        return total

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Cut a byte range at segment boundaries: (segment, offset in it, length)."""
        out = []
        while length:
            seg, off = divmod(offset, self.split)
            n = min(length, self.split - off)
            out.append((seg, off, n))
            offset += n
            length -= n
        return out

    def _sparse_io(self, offset: int, total: int, cur: BufferCursor, write: bool) -> None:
        """Whole sectors go straight through; a partial sector at either end is patched."""
        ss = self.sector_size
        pos, end = offset, offset + total
        while pos < end:
            sector, within = divmod(pos, ss)
            if within or end - pos < ss:
                n = min(end, (sector + 1) * ss) - pos
                self._partial(sector, within, cur.take(n), write)
                pos += n
            else:
                count = (end - pos) // ss
                if write:
                    self._write_sectors(sector, count, cur)
                else:
                    self._read_sectors(sector, count, cur)
                pos += count * ss

    def _partial(self, sector: int, within: int, data: list[memoryview], write: bool) -> None:
        tmp = memoryview(bytearray(self.sector_size))
        n = sum(len(d) for d in data)
        if not write:
            self._read_sectors(sector, 1, BufferCursor([tmp]))
            copy_out(tmp[within:within + n], data)
            return
        # Two sub-sector writes to one sector must not both read the old sector.
        with self._rmw_lock:
            self._read_sectors(sector, 1, BufferCursor([tmp]))
            copy_in(data, tmp, within)
            self._write_sectors(sector, 1, BufferCursor([tmp]))

    def _runs(self, first: int, entries: list[int]) -> list[tuple[int, int, int, int]]:
        """Group sectors into runs within one segment: all unwritten, or at consecutive slots.

        Yields (segment, start index, end index, first slot or FREE); each run is one
        preadv/pwritev (or one zero fill).
        """
        runs = []
        spp = self._split_sectors
        i, n = 0, len(entries)
        while i < n:
            seg = (first + i) // spp
            stop = min(n, (seg + 1) * spp - first)
            e = entries[i]
            j = i + 1
            if e == FREE:
                while j < stop and entries[j] == FREE:
                    j += 1
            else:
                while j < stop and entries[j] != FREE and entries[j] == e + (j - i):
                    j += 1
                if e + (j - i) > self._next[seg]:
                    raise OSError(errno.EIO, f"{lut_path(self.base)}: sector {first + i} points "
                                             f"past the end of {segment_path(self.base, seg)} "
                                             "(corrupt LUT)")
            runs.append((seg, i, j, e))
            i = j
        return runs

    def _read_sectors(self, first: int, count: int, cur: BufferCursor) -> None:
        assert self._lut is not None
        ss = self.sector_size
        for seg, i, j, slot in self._runs(first, self._lut[first:first + count].tolist()):
            data = cur.take((j - i) * ss)
            if slot == FREE:
                zero_fill(data)
            else:
                preadv_full(self._seg_fds[seg], slot * ss, data)

    def _write_sectors(self, first: int, count: int, cur: BufferCursor) -> None:
        assert self._lut is not None
        ss = self.sector_size
        fresh: dict[int, list[tuple[int, list[memoryview]]]] = {}
        for seg, i, j, slot in self._runs(first, self._lut[first:first + count].tolist()):
            data = cur.take((j - i) * ss)
            if slot != FREE:
                pwritev_full(self._seg_fds[seg], slot * ss, data)
                self._mark_dirty(seg)
            elif not is_zero(data):
                sub = BufferCursor(data)
                for k in range(i, j):
                    one = sub.take(ss)
                    if not is_zero(one):
                        fresh.setdefault(seg, []).append((first + k, one))
        for seg, items in fresh.items():
            self._allocate(seg, items)

    def _allocate(self, seg: int, items: list[tuple[int, list[memoryview]]]) -> None:
        """Append never-written sectors to their segment, then point their LUT entries at them."""
        assert self._lut is not None
        ss = self.sector_size
        fd = self._seg_fds[seg]
        late: list[tuple[int, list[memoryview]]] = []
        with self._alloc_locks[seg]:
            new = []
            for sector, data in items:
                # Another thread may have allocated it since we looked: then write in place.
                (new if self._lut[sector] == FREE else late).append((sector, data))
            if new:
                slot = self._next[seg]
                if slot + len(new) >= FREE:
                    raise OSError(errno.ENOSPC, f"{segment_path(self.base, seg)}: segment full")
                pwritev_full(fd, slot * ss, [d for _, data in new for d in data])
                os.fdatasync(fd)  # data durable first: no entry may point at missing data
                self._next[seg] = slot + len(new)
                self._data_sectors[seg] = slot + len(new)
                for k, (sector, _) in enumerate(new):
                    self._lut[sector] = slot + k
                self._sync_lut(new[0][0], new[-1][0] + 1)
        for sector, data in late:
            pwritev_full(fd, self._lut[sector] * ss, data)
            self._mark_dirty(seg)

    def _sync_lut(self, first: int, end: int) -> None:
        """msync the LUT pages holding entries [first, end): same durability as fdatasync."""
        assert self._lut_map is not None
        start = first * 4 // PAGE * PAGE
        self._lut_map.flush(start, end * 4 - start)

    def _mark_dirty(self, seg: int) -> None:
        with self._dirty_lock:
            self._dirty.add(seg)

    def flush(self) -> None:
        if self.read_only:
            return
        if not self.sparse:
            for r in self._raw:
                r.flush()
            return
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        try:
            for seg in sorted(dirty):
                os.fdatasync(self._seg_fds[seg])
        except OSError:
            with self._dirty_lock:
                self._dirty |= dirty
            raise

    # -- discard and zeroing -----------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        check_range(self.base, offset, length, self.size)
        if not self.sparse:
            for seg, off, n in self._pieces(offset, length):
                self._raw[seg].discard(off, n)
            return
        self._unmap(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check_writable()
        check_range(self.base, offset, length, self.size)
        if not self.sparse:
            for seg, off, n in self._pieces(offset, length):
                self._raw[seg].write_zeroes(off, n, unmap)
        elif unmap:
            self._unmap(offset, length)
        else:
            # Zero writes skip unwritten sectors and overwrite written ones in place.
            write_zeros(self, offset, length)

    def _unmap(self, offset: int, length: int) -> None:
        """Mark whole sectors unwritten; zero the partial sectors at either end in place."""
        assert self._lut is not None
        ss = self.sector_size
        first = -(-offset // ss)
        end = (offset + length) // ss
        if first >= end:
            write_zeros(self, offset, length)
            return
        if offset < first * ss:
            write_zeros(self, offset, first * ss - offset)
        if (offset + length) > end * ss:
            write_zeros(self, end * ss, offset + length - end * ss)
        step = 1 << 16
        for a in range(first, end, step):
            b = min(end, a + step)
            changed = False
            for k, e in enumerate(self._lut[a:b].tolist()):
                if e != FREE:
                    self._lut[a + k] = FREE
                    changed = True
            if changed:
                self._sync_lut(a, b)

    def problems(self, limit: int = 20) -> list[str]:
        """Scan the LUT; one line per bad entry (at most ``limit``, then a count of the rest).

        An entry is bad when it points at or past the end of its segment's whole sectors (a
        truncated segment, or a value no write ever stored), or at a slot another sector
        already uses (two sectors would alias). Runs of 1024 unwritten entries are skipped at
        memcmp speed and runs of 1024 consecutive slots in bulk, so the cost follows the data
        the image holds, not its size (a 512 MiB LUT: about a second free or written in order);
        entries written out of order cost some 150 ns each (a byte per slot in a bitmap).
        """
        if not self.sparse:
            return []
        assert self._lut is not None and self._lut_map is not None
        lut, raw = self._lut, memoryview(self._lut_map)
        spp, total = self._split_sectors, len(self._lut)
        block = 1024
        free_block = b"\xff" * (4 * block)
        ones = b"\x01" * block
        out: list[str] = []
        more = 0
        try:
            for seg, limit_slots in enumerate(self._data_sectors):
                seen = bytearray(limit_slots)
                name = segment_path(self.base, seg)
                for a in range(seg * spp, min(total, (seg + 1) * spp), block):
                    b = min(total, (seg + 1) * spp, a + block)
                    n = b - a
                    chunk = raw[4 * a:4 * b].tobytes()
                    if chunk == free_block[:4 * n]:
                        continue
                    e0 = lut[a]
                    # The common case, a run of consecutive slots, in bulk.
                    if e0 != FREE and e0 + n <= limit_slots and seen.find(1, e0, e0 + n) < 0 \
                            and chunk == array.array("I", range(e0, e0 + n)).tobytes():
                        seen[e0:e0 + n] = ones[:n]
                        continue
                    for k, e in enumerate(lut[a:b].tolist()):
                        if e == FREE:
                            continue
                        if e >= limit_slots:
                            problem = (f"{lut_path(self.base)}: sector {a + k} points at slot "
                                       f"{e}, past the end of {name} ({limit_slots} sectors; "
                                       "truncated segment or corrupt LUT)")
                        elif seen[e]:
                            first = seg * spp + lut[seg * spp:a + k].tolist().index(e)
                            problem = (f"{lut_path(self.base)}: sectors {first} and {a + k} "
                                       f"both point at slot {e} of {name} (corrupt LUT)")
                        else:
                            seen[e] = 1
                            continue
                        if len(out) < limit:
                            out.append(problem)
                        else:
                            more += 1
                        if limit == 1:
                            return out
        finally:
            raw.release()
        if more:
            out.append(f"{lut_path(self.base)}: and {more} more bad entries")
        return out

    def check(self) -> None:
        """Raise the first problem :meth:`problems` finds, as a one-line VmrunError."""
        bad = self.problems(limit=1)
        if bad:
            raise VmrunError(bad[0])

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(errno.EROFS, f"{self.base}: disk is read-only")

    def close(self) -> None:
        for r in self._raw:
            r.close()
        self._raw = []
        try:
            if self._lut is not None:
                self._lut.release()
            if self._lut_map is not None:
                self._lut_map.close()
        except BufferError:
            pass  # a view is still alive somewhere: the mapping goes when it is collected
        self._lut = None
        self._lut_map = None
        for fd in self._seg_fds:
            os.close(fd)
        self._seg_fds = []
        if self._lut_fd >= 0:
            os.close(self._lut_fd)
            self._lut_fd = -1

    def __repr__(self) -> str:
        kind = "sparse" if getattr(self, "sparse", False) else "split"
        return f"SparseSplitDisk({str(self.base)!r}, {kind}, size={getattr(self, 'size', None)})"
