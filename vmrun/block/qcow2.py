"""qcow2 images (versions 2 and 3), read and written as QEMU's own tools read and write them.

The format (QEMU's docs/interop/qcow2.txt), in short: the guest disk is cut into clusters
(512 bytes to 2 MiB). A two-level table maps a guest cluster to a host cluster of the file: the
L1 table (in memory here, whole) points at L2 tables (one cluster each, in an LRU cache), whose
entries give the host offset of the data, or say "zero", "compressed at ... (raw deflate)", or
"not allocated" (then the backing file, or zeros, show through). Every host cluster in use has a
reference count in refcount blocks listed by the refcount table; a count of 0 means free.

Guest I/O goes straight between guest RAM and the data clusters with ``preadv``/``pwritev`` on
the memoryviews the device hands us (zero-copy); only the metadata lookups take a lock, and the
tables they need are cached. A write to a cluster not yet allocated (or shared, compressed,
zero) gets a new cluster, filled around the guest's bytes from what showed through before, and
a new L2 entry.

Metadata changes stay in the caches until :meth:`Qcow2Image.flush`, which writes them in the
order that keeps the image consistent after a crash at any point (QEMU's order): the data
(fsync), then the refcount blocks that count the new clusters (fsync), then the L2 tables that
point at them (fsync), then the L1 table and header (fsync), and only then the refcount
decrements of clusters the new tables no longer use (fsync). A crash in between can leak a
cluster (counted but unused: ``qemu-img check`` reports it, harmlessly), never leave a table
pointing at a cluster counted free. An L2 table evicted from a full cache is written with the
same ordering.

The image is hostile input: every header field is checked against the file's size before
anything is read or allocated, tables are bounded as QEMU bounds them, and a bad table entry
met later is a guest I/O error (and, for a writable image, the header's corrupt bit, as QEMU
sets it), never an exception of another kind. Not supported, each refused with one line:
encryption, external data files, extended L2 entries (subclusters), zstd compression, and
writing to an image with internal snapshots (reading one is fine: the active L1 is used).
"""

from __future__ import annotations

import array
import bisect
import errno
import logging
import os
import re
import stat
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

from vmrun.block.backend import (
    BlockBackend,
    check_range,
    check_sector_sizes,
    preadv_full,
    pwritev_full,
)
from vmrun.block.raw import _host_block_size, buffer_address, lock_image, open_image_file
from vmrun.core.dma import BufferCursor, Buffers, buffers_len, copy_out, zero_fill
from vmrun.errors import VmrunError

log = logging.getLogger("vmrun.block")

MAGIC = b"QFI\xfb"
HEADER = struct.Struct(">4sIQIIQIIQQIIQ")      # the 72 bytes every version has
HEADER_V3 = struct.Struct(">QQQII")             # features, refcount order, header length
V3_HEADER_LENGTH = 112                          # what QEMU 7.2 writes (compression type + pad)
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20                         # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20                    # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_CHAIN = 32                                  # backing files below one image
# Metadata clusters a writable image may have (each is remembered, so that no allocation can
# hand one out): 1M L2 tables map 512 TiB with 64K clusters.
MAX_TABLES = 1 << 20
MAX_VIRTUAL_SIZE = 1 << 61                      # QEMU's QCOW_MAX... (2 EiB) is plenty

# Header field offsets, for updating one field in place (extensions stay untouched).
OFF_REFTABLE = 48
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88

INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16
INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type",
                  4: "extended L2 entries"}

EXT_END, EXT_BACKING_FORMAT, EXT_FEATURES = 0, 0xE2792ACA, 0x6803F857
EXT_DATA_FILE, EXT_CRYPTO = 0x44415441, 0x0537BE77

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE
REFTABLE_RESERVED = 0x1FF

_NOT_DIRECT = COMPRESSED | ZERO | L2_RESERVED

# What a guest cluster is, from its L2 entry.
UNALLOCATED, ZEROES, DATA, COMPRESSED_DATA = 0, 1, 2, 3

L2_CACHE_BYTES = 16 << 20
REFBLOCK_CACHE_BYTES = 4 << 20
MAX_RUN_BYTES = 8 << 20                         # one allocating write at most
_LITTLE = sys.byteorder == "little"


class Qcow2Error(VmrunError):
    """The image is not one we can open (the message names the file and what is wrong)."""


def is_qcow2(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file (or block device) that starts with qcow2's magic.

    Only those are opened (a FIFO could block); anything else is left to the raw backend,
    which refuses what is not a disk with its own one line."""
    try:
        st = os.stat(path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return os.pread(fd, 4, 0) == MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _decode_u64(data: bytes | bytearray | memoryview) -> array.array:
    a = array.array("Q")
    a.frombytes(data)
    if _LITTLE:
        a.byteswap()
    return a


def _encode_u64(a: array.array) -> bytes:
    if not _LITTLE:
        return a.tobytes()
    b = array.array("Q", a)
    b.byteswap()
    return b.tobytes()


class _Refblock:
    """Codec for one refcount block of ``bits``-bit big-endian entries (QEMU's order: for
    entries narrower than a byte, the least significant bits first)."""

    _TYPES = {8: "B", 16: "H", 32: "I", 64: "Q"}

    def __init__(self, bits: int) -> None:
        self.bits = bits
        code = self._TYPES.get(bits)
        if code is not None and array.array(code).itemsize * 8 != bits:
            code = "L" if array.array("L").itemsize * 8 == bits else None
        self.code = code

    def decode(self, data: bytes) -> array.array:
        if self.code is not None:
            a = array.array(self.code)
            a.frombytes(data)
            if _LITTLE and self.bits > 8:
                a.byteswap()
            return a
        if self.bits < 8:
            per, mask = 8 // self.bits, (1 << self.bits) - 1
            return array.array("B", ((byte >> (self.bits * k)) & mask
                                     for byte in data for k in range(per)))
        step = self.bits // 8
        return array.array("Q", (int.from_bytes(data[i:i + step], "big")
                                 for i in range(0, len(data), step)))

    def encode(self, a: array.array) -> bytes:
        if self.code is not None:
            if _LITTLE and self.bits > 8:
                b = array.array(self.code, a)
                b.byteswap()
                return b.tobytes()
            return a.tobytes()
        if self.bits < 8:
            per = 8 // self.bits
            out = bytearray(len(a) // per)
            for i in range(len(out)):
                v = 0
                for k in range(per):
                    v |= a[i * per + k] << (self.bits * k)
                out[i] = v
            return bytes(out)
        step = self.bits // 8
        return b"".join(v.to_bytes(step, "big") for v in a)

    def new(self, entries: int) -> array.array:
        code = self.code or ("B" if self.bits < 8 else "Q")
        return array.array(code, bytes(entries * array.array(code).itemsize))


class _Table:
    __slots__ = ("entries", "dirty")

    def __init__(self, entries: array.array, dirty: bool = False) -> None:
        self.entries = entries
        self.dirty = dirty


def _one_line_name(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


class Qcow2Image(BlockBackend):
    """A qcow2 image file (and, read-only below it, its chain of backing files)."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False,
                 nocache: bool = False, sync: bool = False,
                 sector_size: tuple[int, int] = (512, 512), discard: bool = True,
                 *, _chain: tuple[tuple[int, int], ...] = (), check_only: bool = False,
                 l2_cache_bytes: int = L2_CACHE_BYTES) -> None:
        """``check_only``: open read-only even with the corrupt bit, for ``image check``."""
        self.path = Path(path)
        try:
            self.logical_sector_size, self.physical_sector_size = check_sector_sizes(
                *sector_size)
        except ValueError as e:
            raise VmrunError(f"{self.path}: {e}") from None
        self.read_only = read_only
        self.nocache = nocache
        self.backing: BlockBackend | None = None
        self.backing_name: str | None = None
        self.backing_format: str | None = None
        self._fd = self._dfd = -1
        self._lock = threading.RLock()
        self._l2_cache: OrderedDict[int, _Table] = OrderedDict()
        self._rb_cache: OrderedDict[int, _Table] = OrderedDict()
        self._zc: OrderedDict[int, bytes] = OrderedDict()   # decompressed clusters
        self._pending_free: list[tuple[int, int]] = []         # (host offset, bytes)
        self._l1_dirty = False
        self._reftable_dirty = False
        self._data_dirty = False
        self._corrupt = False
        self._meta: array.array = array.array("Q")
        self._l2_cache_bytes = l2_cache_bytes
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if sync:
            flags |= os.O_SYNC
        self._fd = open_image_file(self.path, flags)
        try:
            st = os.fstat(self._fd)
            ident = (st.st_dev, st.st_ino)
            if ident in _chain:
                raise Qcow2Error(f"{self.path}: backing file chain loops back to this image")
            lock_image(self._fd, self.path, read_only)
            self._file_size = os.lseek(self._fd, 0, os.SEEK_END)
            self._parse_header(check_only)
            if nocache:
                self._dfd = open_image_file(self.path, flags | os.O_DIRECT)
                # What O_DIRECT needs here, as the raw backend finds it (a wrong guess comes
                # back as EINVAL and the request is served through the buffered descriptor).
                self._align = max(_host_block_size(self._dfd, st), self.logical_sector_size)
            else:
                self._dfd = self._fd
                self._align = 1
            self._open_backing(_chain + (ident,), nocache)
            if not read_only:
                self._prepare_writes()
            self.supports_discard = discard and not read_only
        except BaseException:
            self.close(flush=False)
            raise

    # -- opening -------------------------------------------------------------------------

    def _bad(self, what: str) -> Qcow2Error:
        return Qcow2Error(f"{self.path}: not a valid qcow2 image: {what}")

    def _parse_header(self, check_only: bool) -> None:
        if self._file_size < HEADER.size:
            raise self._bad(f"the file is {self._file_size} bytes, shorter than a header")
        head = os.pread(self._fd, HEADER.size + HEADER_V3.size, 0)
        (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size,
         l1_off, reft_off, reft_clusters, nb_snap, snap_off) = HEADER.unpack_from(head)
        if magic != MAGIC:
            raise self._bad("no qcow2 magic")
        if version not in (2, 3):
            raise Qcow2Error(f"{self.path}: qcow2 version {version} is not supported "
                             "(only 2 and 3)")
        self.version = version
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise self._bad(f"cluster_bits {cluster_bits} (expected {MIN_CLUSTER_BITS} to "
                            f"{MAX_CLUSTER_BITS})")
        cb = self.cluster_bits = cluster_bits
        cs = self.cluster_size = 1 << cb
        self.l2_bits = cb - 3
        if version == 3:
            if self._file_size < HEADER.size + HEADER_V3.size:
                raise self._bad("the file is shorter than a version 3 header")
            (self.incompat, self.compat, self.autoclear, refcount_order,
             header_len) = HEADER_V3.unpack_from(head, HEADER.size)
            if header_len < HEADER.size + HEADER_V3.size or header_len % 8 or \
                    header_len > cs or header_len > self._file_size:
                raise self._bad(f"header length {header_len}")
            if refcount_order > 6:
                raise self._bad(f"refcount_order {refcount_order} (at most 6)")
            compression = 0
            if header_len > 104:
                compression = os.pread(self._fd, 1, 104)[0]
        else:
            self.incompat = self.compat = self.autoclear = 0
            refcount_order, header_len, compression = 4, HEADER.size, 0
        self.header_length = header_len
        self.refcount_order = refcount_order
        self.refcount_bits = 1 << refcount_order
        self._file_clusters = -(-self._file_size // cs)
        self._end = self._file_clusters << cb     # every cluster in use lies below this
        feature_names = self._parse_extensions(header_len, backing_off)
        unknown = self.incompat & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION)
        if unknown:
            names = [feature_names.get(b) or INCOMPAT_NAMES.get(b) or f"bit {b}"
                     for b in range(64) if unknown >> b & 1]
            raise Qcow2Error(f"{self.path}: unsupported qcow2 feature(s): {', '.join(names)}")
        if compression != 0:
            raise Qcow2Error(f"{self.path}: compression type {compression} (zstd) is not "
                             "supported, only deflate")
        if crypt:
            raise Qcow2Error(f"{self.path}: encrypted qcow2 images are not supported")
        if size % 512:
            raise self._bad(f"virtual size {size} is not a multiple of 512")
        if size > MAX_VIRTUAL_SIZE:
            raise self._bad(f"virtual size {size} is too large")
        self.size = size
        if size < self.logical_sector_size:
            raise Qcow2Error(f"{self.path}: virtual size {size} is smaller than one "
                             f"{self.logical_sector_size}-byte sector")
        # L1: large enough for the disk, bounded, inside the file, aligned.
        l2_span = cs << self.l2_bits
        needed = -(-size // l2_span)
        if l1_size < needed:
            raise self._bad(f"L1 table has {l1_size} entries, the disk needs {needed}")
        if l1_size * 8 > MAX_L1_BYTES:
            raise self._bad(f"L1 table of {l1_size} entries is too large")
        self._check_table("L1 table", l1_off, l1_size * 8)
        self.l1_offset, self.l1_size = l1_off, l1_size
        # Only the entries the disk can use are looked at (QEMU keeps the rest as is).
        self._l1 = _decode_u64(self._pread(l1_off, l1_size * 8)) if l1_size else \
            array.array("Q")
        # Refcount table.
        if reft_clusters == 0 or reft_clusters * cs > MAX_REFTABLE_BYTES:
            raise self._bad(f"refcount table of {reft_clusters} clusters")
        self._check_table("refcount table", reft_off, reft_clusters * cs)
        self.reftable_offset, self.reftable_clusters = reft_off, reft_clusters
        self._reftable = _decode_u64(self._pread(reft_off, reft_clusters * cs))
        self._rb_codec = _Refblock(self.refcount_bits)
        self._rb_bits = cb + 3 - refcount_order           # log2(entries per refblock)
        self._refcount_max = (1 << self.refcount_bits) - 1
        # Clusters one allocating write takes at most: well inside one refcount block's range
        # (a new block sits at the start of its range, so runs never need to span one).
        self._max_run = max(1, min(MAX_RUN_BYTES >> cb, (1 << self._rb_bits) // 2))
        # Internal snapshots: the table must be sane; the active L1 is all we use.
        if nb_snap > MAX_SNAPSHOTS:
            raise self._bad(f"{nb_snap} snapshots")
        if nb_snap:
            self._check_table("snapshot table", snap_off, 1)
        self.nb_snapshots = nb_snap
        # Backing file name: in the first cluster, at most 1023 bytes.
        if backing_off:
            if backing_len > MAX_BACKING_NAME or backing_len == 0:
                raise self._bad(f"backing file name of {backing_len} bytes")
            if backing_off + backing_len > min(cs, self._file_size):
                raise self._bad("backing file name lies outside the header cluster")
            self.backing_name = os.fsdecode(os.pread(self._fd, backing_len, backing_off))
        self.dirty = bool(self.incompat & INCOMPAT_DIRTY)
        self.corrupt = bool(self.incompat & INCOMPAT_CORRUPT)
        if self.corrupt and not self.read_only and not check_only:
            raise Qcow2Error(f"{self.path}: the image is marked corrupt; repair it with "
                             "`qemu-img check -r all` (or open it read-only)")
        if not self.read_only and nb_snap:
            raise Qcow2Error(f"{self.path}: the image has {nb_snap} internal snapshot(s); "
                             "vmrun can only read such an image (ro = true)")

    def _check_table(self, what: str, offset: int, length: int) -> None:
        cs = self.cluster_size
        if offset % cs:
            raise self._bad(f"{what} offset {offset:#x} is not cluster aligned")
        if offset == 0 and length:
            raise self._bad(f"{what} at offset 0 (the header)")
        if offset + length > self._file_size:
            raise self._bad(f"{what} ({length} bytes at {offset:#x}) lies past the end of the "
                            f"file ({self._file_size} bytes)")

    def _parse_extensions(self, start: int, backing_off: int) -> dict[int, str]:
        """Header extensions (backing format, feature names); unknown ones are skipped."""
        end = min(backing_off or self.cluster_size, self.cluster_size, self._file_size)
        names: dict[int, str] = {}
        if start > end:
            return names
        data = os.pread(self._fd, end - start, start)
        pos = 0
        for _ in range(4096):
            if pos + 8 > len(data):
                break
            kind, length = struct.unpack_from(">II", data, pos)
            pos += 8
            if kind == EXT_END:
                break
            if length > len(data) - pos:
                raise self._bad(f"header extension {kind:#x} of {length} bytes runs past the "
                                "header cluster")
            body = data[pos:pos + length]
            if kind == EXT_BACKING_FORMAT:
                self.backing_format = _one_line_name(body)
            elif kind == EXT_FEATURES:
                for i in range(0, length - 47, 48):
                    ftype, bit = body[i], body[i + 1]
                    if ftype == 0:
                        names[bit] = _one_line_name(body[i + 2:i + 48].rstrip(b"\0"))
            elif kind == EXT_DATA_FILE:
                raise Qcow2Error(f"{self.path}: qcow2 images with an external data file are "
                                 "not supported")
            pos += (length + 7) & ~7
        return names

    def _open_backing(self, chain: tuple[tuple[int, int], ...], nocache: bool) -> None:
        if self.backing_name is None:
            return
        name = self.backing_name
        if name.startswith("json:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name):
            raise Qcow2Error(f"{self.path}: backing file {name!r} is not a local file")
        if len(chain) > MAX_CHAIN:
            raise Qcow2Error(f"{self.path}: backing file chain is deeper than {MAX_CHAIN}")
        name = name.removeprefix("file:")
        bpath = Path(name) if os.path.isabs(name) else self.path.parent / name
        fmt = self.backing_format
        if fmt is None:
            fmt = "qcow2" if is_qcow2(bpath) else "raw"
        if fmt == "qcow2":
            self.backing = Qcow2Image(bpath, read_only=True, nocache=nocache,
                                      sector_size=(512, 512), discard=False, _chain=chain)
        elif fmt == "raw":
            from vmrun.block.raw import RawFile

            try:
                st = os.stat(bpath)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) in chain:
                raise Qcow2Error(f"{self.path}: backing file chain loops back to {bpath}")
            self.backing = RawFile(bpath, read_only=True, nocache=False, discard=False)
        else:
            raise Qcow2Error(f"{self.path}: backing file {bpath} has format {fmt!r} "
                             "(only qcow2 and raw are supported)")

    def _prepare_writes(self) -> None:
        """Checks and header updates a writable open needs: a refcount repair after an
        unclean close with lazy refcounts (the dirty bit, as QEMU does), the autoclear bits
        cleared (we keep no bitmaps up to date), and the list of metadata clusters that no
        allocation may ever hand out."""
        cb = self.cluster_bits
        tables = sum(1 for e in self._l1 if e & OFFSET_MASK) + \
            sum(1 for e in self._reftable if e & ~REFTABLE_RESERVED)
        if tables > MAX_TABLES:
            raise Qcow2Error(f"{self.path}: the image has {tables} L2 tables and refcount "
                             f"blocks, more than vmrun opens for writing ({MAX_TABLES})")
        meta = [0]
        meta.extend(range(self.l1_offset >> cb, -(-(self.l1_offset + self.l1_size * 8) >> cb)))
        meta.extend(range(self.reftable_offset >> cb,
                          (self.reftable_offset >> cb) + self.reftable_clusters))
        for e in self._l1:
            off = e & OFFSET_MASK
            if off:
                meta.append(off >> cb)
        for e in self._reftable:
            off = e & ~REFTABLE_RESERVED
            if off:
                meta.append(off >> cb)
        meta.sort()
        for a, b in zip(meta, meta[1:], strict=False):
            if a == b:
                raise Qcow2Error(f"{self.path}: the image is corrupt (metadata cluster {a:#x} "
                                 "is used twice); check it with `qemu-img check`")
        self._meta = array.array("Q", meta)
        self._free_hint = 0
        if self.dirty:
            from vmrun.block.qcow2_check import repair_refcounts

            repair_refcounts(self)
            self._set_incompat(self.incompat & ~INCOMPAT_DIRTY)
            self.dirty = False
        if self.autoclear:
            self.autoclear = 0
            self._pwrite(OFF_AUTOCLEAR, struct.pack(">Q", 0))
            os.fsync(self._fd)

    def _set_incompat(self, value: int) -> None:
        self.incompat = value
        self._pwrite(OFF_INCOMPAT, struct.pack(">Q", value))
        os.fsync(self._fd)

    # -- low-level file access ---------------------------------------------------------------

    def _pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        preadv_full(self._fd, offset, [memoryview(buf)])
        return bytes(buf)

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        pwritev_full(self._fd, offset, [memoryview(data)])

    def _data_fd(self, offset: int, views: list[memoryview]) -> int:
        """The O_DIRECT descriptor when the transfer is aligned for it, else the buffered one."""
        if self._dfd == self._fd:
            return self._fd
        a = self._align
        if offset % a:
            return self._fd
        for v in views:
            if len(v) % a or buffer_address(v) % a:
                return self._fd
        return self._dfd

    def _data_read(self, offset: int, views: list[memoryview]) -> None:
        try:
            preadv_full(self._data_fd(offset, views), offset, views)
        except OSError as e:
            if e.errno != errno.EINVAL or self._dfd == self._fd:
                raise
            preadv_full(self._fd, offset, views)

    def _data_write(self, offset: int, views: list[memoryview]) -> None:
        try:
            pwritev_full(self._data_fd(offset, views), offset, views)
        except OSError as e:
            if e.errno != errno.EINVAL or self._dfd == self._fd:
                raise
            pwritev_full(self._fd, offset, views)

    # -- corruption ----------------------------------------------------------------------------

    def _corruption(self, what: str) -> OSError:
        """A bad table entry met during I/O: a guest I/O error, and for a writable image the
        header's corrupt bit (QEMU does the same), after which writes are refused."""
        msg = f"{self.path}: corrupt qcow2 image: {what}"
        if not self.read_only and not self._corrupt:
            self._corrupt = True
            log.error("%s; marking the image corrupt, no more writes", msg)
            try:
                self._set_incompat(self.incompat | INCOMPAT_CORRUPT)
            except OSError:
                pass
        return OSError(errno.EIO, msg)

    # -- tables --------------------------------------------------------------------------------

    def _evict(self, cache: OrderedDict[int, _Table], limit: int, is_l2: bool) -> None:
        cs = self.cluster_size
        while len(cache) * cs > limit and len(cache) > 1:
            off, table = next(iter(cache.items()))
            if table.dirty:
                if is_l2:
                    self._sync_increments()
                    self._pwrite(off, _encode_u64(table.entries))
                else:
                    self._pwrite(off, self._rb_codec.encode(table.entries))
            del cache[off]

    def _l2_table(self, l1_index: int) -> tuple[int, _Table] | None:
        """The L2 table for one L1 entry (offset, table), or None if it has none."""
        e = self._l1[l1_index]
        off = e & OFFSET_MASK
        if not off:
            return None
        if e & L1_RESERVED or off % self.cluster_size or off + self.cluster_size > self._end:
            raise self._corruption(f"L1 entry {l1_index} ({e:#x}) is not a valid L2 table "
                                   "offset")
        cache = self._l2_cache
        t = cache.get(off)
        if t is not None:
            cache.move_to_end(off)
            return off, t
        t = _Table(_decode_u64(self._pread(off, self.cluster_size)))
        cache[off] = t
        self._evict(cache, self._l2_cache_bytes, True)
        return off, t

    def _entry(self, cluster: int) -> int:
        """The L2 entry of a guest cluster (0 when its L2 table does not exist)."""
        got = self._l2_table(cluster >> self.l2_bits)
        if got is None:
            return 0
        return got[1].entries[cluster & ((1 << self.l2_bits) - 1)]

    def _classify(self, entry: int) -> tuple[int, int]:
        """(kind, host offset) of an L2 entry, every offset checked against the file."""
        if entry & COMPRESSED:
            return COMPRESSED_DATA, entry
        if entry & L2_RESERVED:
            raise self._corruption(f"L2 entry {entry:#x} has reserved bits set")
        host = entry & OFFSET_MASK
        if entry & ZERO:
            return ZEROES, host
        if not host:
            return UNALLOCATED, 0
        if host % self.cluster_size or host + self.cluster_size > self._end:
            raise self._corruption(f"L2 entry {entry:#x} points outside the file's clusters")
        return DATA, host

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        """(host byte offset, length) of a compressed cluster's data."""
        shift = 62 - (self.cluster_bits - 8)
        sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        off = entry & ((1 << shift) - 1)
        return off, sectors * 512 - (off & 511)

    def _decompress(self, entry: int) -> bytes:
        got = self._zc.get(entry)
        if got is not None:
            return got
        off, length = self._compressed_range(entry)
        if off + length > self._file_size + 512 or off < self.cluster_size:
            raise self._corruption(f"compressed cluster at {off:#x} lies outside the file")
        length = min(length, self._file_size - off)
        data = self._pread(off, length)
        try:
            out = zlib.decompressobj(-15).decompress(data, self.cluster_size)
        except zlib.error as e:
            raise OSError(errno.EIO, f"{self.path}: compressed cluster at {off:#x} does not "
                                     f"inflate: {e}") from None
        if len(out) != self.cluster_size:
            raise OSError(errno.EIO, f"{self.path}: compressed cluster at {off:#x} inflates "
                                     f"to {len(out)} bytes, not {self.cluster_size}")
        with self._lock:
            self._zc[entry] = out
            if len(self._zc) * self.cluster_size > (4 << 20):
                self._zc.popitem(last=False)
        return out

    # -- refcounts -----------------------------------------------------------------------------

    def _refblock(self, index: int, create: bool = False) -> _Table | None:
        """Refcount block ``index`` (covering clusters index << rb_bits ...), or None."""
        if index >= len(self._reftable):
            return None
        e = self._reftable[index]
        off = e & ~REFTABLE_RESERVED
        if not off:
            return None
        if e & REFTABLE_RESERVED or off % self.cluster_size or \
                off + self.cluster_size > self._end:
            raise self._corruption(f"refcount table entry {index} ({e:#x}) is not a valid "
                                   "refcount block offset")
        cache = self._rb_cache
        t = cache.get(off)
        if t is not None:
            cache.move_to_end(off)
            return t
        t = _Table(self._rb_codec.decode(self._pread(off, self.cluster_size)))
        cache[off] = t
        self._evict(cache, REFBLOCK_CACHE_BYTES, False)
        return t

    def refcount(self, cluster: int) -> int:
        t = self._refblock(cluster >> self._rb_bits)
        if t is None:
            return 0
        return t.entries[cluster & ((1 << self._rb_bits) - 1)]

    def _add_ref(self, cluster: int, delta: int) -> None:
        index = cluster >> self._rb_bits
        t = self._refblock(index)
        if t is None:
            if delta < 0:
                raise self._corruption(f"freeing cluster {cluster:#x}, which has no refcount")
            self._new_refblock(index)
            t = self._refblock(index)
            assert t is not None
        i = cluster & ((1 << self._rb_bits) - 1)
        v = t.entries[i] + delta
        if v < 0:
            raise self._corruption(f"refcount of cluster {cluster:#x} drops below zero")
        if v > self._refcount_max:
            raise OSError(errno.EIO, f"{self.path}: refcount of cluster {cluster:#x} would "
                                     "overflow")
        t.entries[i] = v
        t.dirty = True
        if v == 0 and cluster < self._free_hint:
            self._free_hint = cluster

    def _is_meta(self, cluster: int) -> bool:
        i = bisect.bisect_left(self._meta, cluster)
        return i < len(self._meta) and self._meta[i] == cluster

    def _add_meta(self, cluster: int) -> None:
        bisect.insort(self._meta, cluster)

    def _new_refblock(self, index: int) -> None:
        """A refcount block for range ``index``: placed in its own range (at its first cluster,
        which is free since nothing in the range has a count), so it counts itself."""
        if index >= len(self._reftable):
            self._grow_reftable(index)
            if self._refblock(index) is not None:
                return
        cluster = index << self._rb_bits
        if self._is_meta(cluster):
            raise self._corruption(f"cluster {cluster:#x} is metadata but has no refcount")
        entries = self._rb_codec.new(1 << self._rb_bits)
        entries[0] = 1
        off = cluster << self.cluster_bits
        self._rb_cache[off] = _Table(entries, dirty=True)
        self._reftable[index] = off
        self._reftable_dirty = True
        self._add_meta(cluster)
        self._end = max(self._end, off + self.cluster_size)
        self._evict(self._rb_cache, REFBLOCK_CACHE_BYTES, False)

    def _grow_reftable(self, index: int) -> None:
        """A larger refcount table at the end of the file, with the refcount blocks that count
        it; written and made durable, then the header points at it (as QEMU grows it)."""
        cb, cs = self.cluster_bits, self.cluster_size
        old_len = len(self._reftable)
        per = cs // 8
        start = self._end >> cb                         # first cluster past everything
        want = max(index + 1, old_len * 2)
        for _ in range(64):
            clusters = -(-want // per)
            if clusters * cs > MAX_REFTABLE_BYTES:
                raise OSError(errno.EFBIG, f"{self.path}: refcount table would exceed "
                                           f"{MAX_REFTABLE_BYTES} bytes")
            # Refcount blocks for the ranges [start, start + clusters + k) needs, placed
            # right after the table.
            k = 0
            while True:
                last = start + clusters + k - 1
                ranges = [r for r in range(start >> self._rb_bits, (last >> self._rb_bits) + 1)
                          if r >= old_len or not self._reftable[r]]
                if len(ranges) <= k:
                    break
                k = len(ranges)
            if max(ranges, default=0) < clusters * per and index < clusters * per:
                break
            want = max(want, max(ranges, default=0) + 1) * 2
        else:  # pragma: no cover - the loop always settles within a few rounds
            raise OSError(errno.EFBIG, f"{self.path}: cannot grow the refcount table")
        new = array.array("Q", self._reftable)
        new.extend([0] * (clusters * per - old_len))
        blocks: dict[int, array.array] = {}
        for j, r in enumerate(ranges):
            off = (start + clusters + j) << cb
            new[r] = off
            blocks[r] = self._rb_codec.new(1 << self._rb_bits)
        # Count the table and the new blocks.
        for c in range(start, start + clusters + len(ranges)):
            r = c >> self._rb_bits
            if r in blocks:
                blocks[r][c & ((1 << self._rb_bits) - 1)] += 1
        # The flush order: dirty refcounts first, so nothing durable is undercounted.
        self._sync_increments()
        for r, entries in blocks.items():
            self._pwrite(new[r], self._rb_codec.encode(entries))
        table_off = start << cb
        self._pwrite(table_off, _encode_u64(new))
        self._end = max(self._end, (start + clusters + len(ranges)) << cb)
        os.fsync(self._fd)
        self._pwrite(OFF_REFTABLE, struct.pack(">QI", table_off, clusters))
        os.fsync(self._fd)
        old_off, old_clusters = self.reftable_offset, self.reftable_clusters
        self._reftable = new
        self._reftable_dirty = False
        self.reftable_offset, self.reftable_clusters = table_off, clusters
        for c in range(start, start + clusters + len(ranges)):
            self._add_meta(c)
            if (c >> self._rb_bits) not in blocks:
                self._add_ref(c, 1)
        for c in range(old_off >> cb, (old_off >> cb) + old_clusters):
            i = bisect.bisect_left(self._meta, c)
            if i < len(self._meta) and self._meta[i] == c:
                del self._meta[i]
        self._pending_free.append((old_off, old_clusters * cs))

    def _alloc(self, n: int) -> int:
        """``n`` contiguous free clusters, counted (in the cache); returns the host offset."""
        cb = self.cluster_bits
        per_block = 1 << self._rb_bits
        for _ in range(1000):
            start = self._find_free(self._free_hint, n)
            ok = True
            for r in range(start >> self._rb_bits, ((start + n - 1) >> self._rb_bits) + 1):
                if self._refblock(r) is None:
                    self._new_refblock(r)
                    ok = False
            if not ok:
                continue            # a new block may have taken one of the clusters
            for c in range(start, start + n):
                if self._is_meta(c):
                    raise self._corruption(f"cluster {c:#x} holds metadata but its refcount "
                                           "is 0")
            for c in range(start, start + n):
                self._add_ref(c, 1)
            if start == self._free_hint:
                self._free_hint = start + n
            self._end = max(self._end, (start + n) << cb)
            return start << cb
        raise OSError(errno.EIO, f"{self.path}: cannot allocate {n} clusters "
                                 f"({per_block} per refcount block)")

    def _find_free(self, hint: int, n: int) -> int:
        """The first run of ``n`` clusters with refcount 0 at or after ``hint``."""
        run_start, run = hint, 0
        c = hint
        per = 1 << self._rb_bits
        limit = max(self._end >> self.cluster_bits, hint) + n + 1
        while c < limit + per:
            t = self._refblock(c >> self._rb_bits)
            block_end = ((c >> self._rb_bits) + 1) * per
            if t is None:
                if run == 0:
                    run_start = c
                run += block_end - c
                if run >= n:
                    return run_start
                c = block_end
                continue
            entries = t.entries
            i = c & (per - 1)
            if run == 0 and c == self._free_hint:
                # Everything before the first free cluster is in use: start there next time.
                try:
                    i = entries.index(0, i)
                except ValueError:
                    i = per
                self._free_hint = hint = (c & ~(per - 1)) + i
            while i < per:
                if entries[i] == 0:
                    if run == 0:
                        run_start = (c & ~(per - 1)) + i
                    run += 1
                    if run >= n:
                        return run_start
                    i += 1
                else:
                    run = 0
                    try:
                        i = entries.index(0, i + 1)
                    except ValueError:
                        i = per
            c = block_end
        return max(self._end >> self.cluster_bits, hint)

    def _free(self, offset: int, length: int) -> None:
        """Drop one reference to every cluster of a host range, after the next flush has made
        the tables that stopped using it durable."""
        self._pending_free.append((offset, length))

    def _release(self, entry: int) -> None:
        """Give back what a replaced L2 entry held."""
        if entry & COMPRESSED:
            off, length = self._compressed_range(entry)
            self._free(off, length)
        elif entry & OFFSET_MASK:
            self._free(entry & OFFSET_MASK, self.cluster_size)

    # -- L2 updates ------------------------------------------------------------------------------

    def _set_entry(self, cluster: int, value: int) -> None:
        l1_index = cluster >> self.l2_bits
        got = self._l2_table(l1_index)
        if got is None:
            if value == 0:
                return
            off = self._alloc(1)
            self._add_meta(off >> self.cluster_bits)
            t = _Table(array.array("Q", bytes(self.cluster_size)), dirty=True)
            self._l2_cache[off] = t
            self._l1[l1_index] = off | COPIED
            self._l1_dirty = True
            self._evict(self._l2_cache, self._l2_cache_bytes, True)
        else:
            off, t = got
            if not self._l1[l1_index] & COPIED:
                if self.refcount(off >> self.cluster_bits) != 1:
                    raise OSError(errno.EIO, f"{self.path}: L2 table at {off:#x} is shared "
                                             "(internal snapshots are not supported)")
                self._l1[l1_index] |= COPIED
                self._l1_dirty = True
        t.entries[cluster & ((1 << self.l2_bits) - 1)] = value
        t.dirty = True
        self._l2_cache.move_to_end(off)

    # -- native AIO (vmrun.block.queue) ----------------------------------------------------------

    def direct_io(self) -> tuple[int, int] | None:
        """With ``nocache``, requests on allocated clusters may go out as native AIO on the
        O_DIRECT descriptor (:meth:`direct_map` says where); everything else takes the
        worker threads."""
        return (self._dfd, self._align) if self._dfd != self._fd else None

    def direct_map(self, offset: int, length: int, write: bool) -> int | None:
        """The host offset of guest bytes ``offset .. +length`` when they are data clusters
        that follow each other in the file (and, for a write, are this image's own: COPIED),
        so the request needs no table change; else None. Called for every request on the
        loop thread, hence inline: the tables are looked up in the cache directly."""
        if offset < 0 or length <= 0 or offset + length > self.size or \
                (write and (self.read_only or self._corrupt)):
            return None
        cb, cs, l2_bits = self.cluster_bits, self.cluster_size, self.l2_bits
        l2_mask = (1 << l2_bits) - 1
        first, last = offset >> cb, (offset + length - 1) >> cb
        need = COPIED if write else 0
        end = self._end
        cache = self._l2_cache
        start = -1
        with self._lock:
            try:
                c = first
                while c <= last:
                    t = cache.get(self._l1[c >> l2_bits] & OFFSET_MASK)
                    if t is None:
                        got = self._l2_table(c >> l2_bits)
                        if got is None:
                            return None
                        t = got[1]
                    entries = t.entries
                    i = c & l2_mask
                    stop = min(last - c, l2_mask - i) + i + 1
                    for k in range(i, stop):
                        e = entries[k]
                        host = e & OFFSET_MASK
                        if e & _NOT_DIRECT or not host or host & (cs - 1) or \
                                host + cs > end or (e & need) != need:
                            return None
                        if start < 0:
                            start = host
                        elif host != start + ((c + k - i - first) << cb):
                            return None
                    c += stop - i
                if write:
                    meta = self._meta
                    i = bisect.bisect_left(meta, start >> cb)
                    if i < len(meta) and meta[i] <= (start >> cb) + last - first:
                        return None    # over the image's own tables: the worker refuses it
            except OSError:
                return None        # the worker path reports it
        return start + (offset & (cs - 1))

    # -- reading ---------------------------------------------------------------------------------

    def readv(self, offset: int, bufs: Buffers) -> int:
        total = buffers_len(bufs)
        check_range(self.path, offset, total, self.size)
        cb, cs = self.cluster_bits, self.cluster_size
        cur = BufferCursor(bufs)
        pos, end = offset, offset + total
        while pos < end:
            # One lock hold maps up to MAX_RUN_BYTES; the data moves without it.
            stop = min(end, pos + MAX_RUN_BYTES)
            plan: list[tuple[int, int, int, int]] = []    # kind, host, guest, length
            with self._lock:
                p = pos
                while p < stop:
                    within = p & (cs - 1)
                    n = min(stop - p, cs - within)
                    kind, host = self._classify(self._entry(p >> cb))
                    if kind == DATA:
                        host += within
                    if plan and plan[-1][0] == kind and kind != COMPRESSED_DATA and (
                            kind != DATA or plan[-1][1] + plan[-1][3] == host):
                        k, h, g, ln = plan[-1]
                        plan[-1] = (k, h, g, ln + n)
                    else:
                        plan.append((kind, host, p, n))
                    p += n
            for kind, host, guest, n in plan:
                views = cur.take(n)
                if kind == DATA:
                    self._data_read(host, views)
                elif kind == UNALLOCATED and self.backing is not None:
                    self._read_backing(guest, views)
                elif kind == COMPRESSED_DATA:
                    data = self._decompress(host)
                    within = guest & (cs - 1)
                    copy_out(memoryview(data)[within:within + n], views)
                else:
                    zero_fill(views)
            pos = stop
        return total

    def _read_backing(self, guest: int, views: list[memoryview]) -> None:
        """Read through to the backing file; past its end (a smaller base) reads zeros."""
        assert self.backing is not None
        n = sum(len(v) for v in views)
        have = max(0, min(n, self.backing.size - guest))
        cur = BufferCursor(views)
        if have:
            self.backing.readv(guest, cur.take(have))
        if have < n:
            zero_fill(cur.take(n - have))

    def _old_content(self, cluster: int, entry: int, within: int, view: memoryview) -> None:
        """What guest cluster ``cluster`` reads as at ``within``, into ``view``."""
        kind, host = self._classify(entry)
        if kind == DATA:
            preadv_full(self._fd, host + within, [view])
        elif kind == COMPRESSED_DATA:
            view[:] = memoryview(self._decompress(host))[within:within + len(view)]
        elif kind == UNALLOCATED and self.backing is not None:
            self._read_backing((cluster << self.cluster_bits) + within, [view])
        else:
            zero_fill([view])

    # -- writing ---------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(errno.EROFS, f"{self.path}: disk is read-only")
        if self._corrupt:
            raise OSError(errno.EIO, f"{self.path}: image was found corrupt; writes refused")

    def _in_place(self, cluster: int, entry: int) -> int:
        """The host offset a write to this cluster can go to as is, or -1 (allocate)."""
        if entry & (COMPRESSED | ZERO):
            return -1
        kind, host = self._classify(entry)
        if kind != DATA:
            return -1
        if self._is_meta(host >> self.cluster_bits):
            # QEMU's overlap check: guest data never goes over the image's own tables.
            raise self._corruption(f"L2 entry {entry:#x} points at a metadata cluster")
        if entry & COPIED:
            return host
        if self.refcount(host >> self.cluster_bits) == 1:
            self._set_entry(cluster, entry | COPIED)
            return host
        return -1

    def writev(self, offset: int, bufs: Buffers) -> int:
        self._check_writable()
        total = buffers_len(bufs)
        check_range(self.path, offset, total, self.size)
        cb, cs = self.cluster_bits, self.cluster_size
        cur = BufferCursor(bufs)
        pos, end = offset, offset + total
        while pos < end:
            stop = min(end, pos + MAX_RUN_BYTES)
            direct: list[tuple[int, int]] = []           # host, length
            with self._lock:
                self._check_writable()
                p = pos
                while p < stop:
                    within = p & (cs - 1)
                    n = min(stop - p, cs - within)
                    c = p >> cb
                    entry = self._entry(c)
                    host = self._in_place(c, entry)
                    if host >= 0:
                        host += within
                        if direct and direct[-1][0] + direct[-1][1] == host:
                            direct[-1] = (direct[-1][0], direct[-1][1] + n)
                        else:
                            direct.append((host, n))
                        p += n
                        continue
                    # Write out what was gathered so far, in order, then allocate a run.
                    for h, ln in direct:
                        self._data_write(h, cur.take(ln))
                    direct = []
                    run = [(c, entry)]
                    q = p + n
                    while q < stop and len(run) < self._max_run:
                        c2 = q >> cb
                        e2 = self._entry(c2)
                        if self._in_place(c2, e2) >= 0:
                            break
                        run.append((c2, e2))
                        q += min(stop - q, cs)
                    self._allocating_write(run, p, q, cur)
                    p = q
            # In-place pieces go out without the lock.
            for h, ln in direct:
                self._data_write(h, cur.take(ln))
            pos = stop
        return total

    def _allocating_write(self, run: list[tuple[int, int]], start: int, stop: int,
                          cur: BufferCursor) -> None:
        """New clusters for ``run``, written whole: the guest's bytes, and around them what
        the clusters read as before (backing file, zeros, the old or compressed data)."""
        cb, cs = self.cluster_bits, self.cluster_size
        first, last = run[0][0], run[-1][0]
        host = self._alloc(len(run))
        self._data_dirty = True
        iov: list[memoryview] = []
        head = start - (first << cb)
        if head:
            buf = memoryview(bytearray(head))
            self._old_content(first, run[0][1], 0, buf)
            iov.append(buf)
        iov.extend(cur.take(stop - start))
        tail = ((last + 1) << cb) - stop
        if tail:
            buf = memoryview(bytearray(tail))
            self._old_content(last, run[-1][1], cs - tail, buf)
            iov.append(buf)
        self._data_write(host, iov)
        for i, (c, old) in enumerate(run):
            self._set_entry(c, (host + (i << cb)) | COPIED)
            self._release(old)

    # -- zeroing and discard ---------------------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check_writable()
        check_range(self.path, offset, length, self.size)
        if not length:
            return
        cb, cs = self.cluster_bits, self.cluster_size
        first = -(-offset // cs)
        last = (offset + length) // cs                   # exclusive
        if first >= last:
            self._zero_bytes(offset, length)
            return
        if offset < first << cb:
            self._zero_bytes(offset, (first << cb) - offset)
        if offset + length > last << cb:
            self._zero_bytes(last << cb, offset + length - (last << cb))
        v2_backed = self.version < 3 and self.backing is not None
        with self._lock:
            self._check_writable()
            for c in range(first, last):
                entry = self._entry(c)
                kind, host = self._classify(entry)
                if v2_backed:
                    continue
                if kind == UNALLOCATED and self.backing is None:
                    continue
                if self.version >= 3:
                    if kind == DATA and not unmap and entry & COPIED:
                        new = host | COPIED | ZERO
                    else:
                        new = ZERO
                else:
                    new = 0
                if new != entry:
                    self._set_entry(c, new)
                    if not new & OFFSET_MASK:
                        self._release(entry)
        if v2_backed:
            # Version 2 has no zero flag: the zeros are written over the backing file.
            self._zero_bytes(first << cb, (last - first) << cb)

    def _zero_bytes(self, offset: int, length: int) -> None:
        """Write real zeros, skipping clusters that already read as zeros."""
        cs = self.cluster_size
        zeros = memoryview(bytes(min(length, MAX_RUN_BYTES)))
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, cs - (pos & (cs - 1)))
            with self._lock:
                kind, _ = self._classify(self._entry(pos >> self.cluster_bits))
            if not (kind == ZEROES or (kind == UNALLOCATED and self.backing is None)):
                self.writev(pos, [zeros[:n]])
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Whole clusters are freed (they read as zeros: the zero flag, or unallocated when
        nothing shows through); the partial clusters at either end are zeroed."""
        if not self.supports_discard:
            self._check_writable()
            raise OSError(errno.EOPNOTSUPP, f"{self.path}: discard is not supported")
        self.write_zeroes(offset, length, unmap=True)

    # -- flush -----------------------------------------------------------------------------------

    def _write_dirty(self, cache: OrderedDict[int, _Table], is_l2: bool) -> bool:
        wrote = False
        for off, t in cache.items():
            if t.dirty:
                data = _encode_u64(t.entries) if is_l2 else self._rb_codec.encode(t.entries)
                self._pwrite(off, data)
                t.dirty = False
                wrote = True
        return wrote

    def _sync_increments(self) -> None:
        """Data, then the refcounts that count new clusters, durable (before any table that
        points at them is written)."""
        if self._data_dirty:
            os.fdatasync(self._fd)
            self._data_dirty = False
        if self._write_dirty(self._rb_cache, False):
            os.fsync(self._fd)
        if self._reftable_dirty:
            self._pwrite(self.reftable_offset, _encode_u64(self._reftable))
            self._reftable_dirty = False
            os.fsync(self._fd)

    def flush(self) -> None:
        if self.read_only:
            return
        if self._corrupt:
            raise OSError(errno.EIO, f"{self.path}: image was found corrupt; nothing more is "
                                     "written to it")
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        metadata = (self._data_dirty or self._l1_dirty or self._reftable_dirty or
                    self._pending_free or any(t.dirty for t in self._rb_cache.values()) or
                    any(t.dirty for t in self._l2_cache.values()))
        if not metadata:
            os.fsync(self._fd)
            return
        self._sync_increments()
        if self._write_dirty(self._l2_cache, True):
            os.fsync(self._fd)
        if self._l1_dirty:
            self._pwrite(self.l1_offset, _encode_u64(self._l1))
            self._l1_dirty = False
            os.fsync(self._fd)
        if self._pending_free:
            pending, self._pending_free = self._pending_free, []
            cb = self.cluster_bits
            for off, length in pending:
                for c in range(off >> cb, ((off + length - 1) >> cb) + 1):
                    self._add_ref(c, -1)
            if self._write_dirty(self._rb_cache, False):
                os.fsync(self._fd)

    # -- lifetime --------------------------------------------------------------------------------

    def close(self, flush: bool = True) -> None:
        """Flush (a writable image), then release the files; a second call does nothing."""
        if self._fd >= 0 and flush and not self.read_only and not self._corrupt:
            try:
                self.flush()
            except OSError as e:
                log.error("%s: flush on close failed: %s", self.path, e)
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        for name in ("_dfd", "_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                if name == "_dfd" and fd == self._fd:
                    self._dfd = -1
                    continue
                setattr(self, name, -1)
                os.close(fd)

    def chain(self) -> list[tuple[Path, str]]:
        """This image and its backing files, top first: (path, format)."""
        out: list[tuple[Path, str]] = [(self.path, "qcow2")]
        b = self.backing
        while b is not None:
            if isinstance(b, Qcow2Image):
                out.append((b.path, "qcow2"))
                b = b.backing
            else:
                out.append((getattr(b, "path", Path("?")), "raw"))
                b = None
        return out

    def __repr__(self) -> str:
        return (f"Qcow2Image({str(self.path)!r}, v{getattr(self, 'version', '?')}, "
                f"size={getattr(self, 'size', None)}, read_only={self.read_only})")
