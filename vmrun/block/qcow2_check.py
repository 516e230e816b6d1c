"""Creating qcow2 images, and checking their reference counts as ``qemu-img check`` does.

:func:`scan` walks every table (the active L1 and those of internal snapshots, their L2
tables, the refcount table) and counts how often each host cluster is used; comparing that with
the stored refcounts gives leaks (stored more than used: harmless, wasted space) and
corruptions (stored less than used: a later allocation would hand out a cluster in use).
:func:`repair_refcounts` stores the counted values, which is what opening a "dirty" image
(lazy refcounts, not closed cleanly) for writing needs, as QEMU does.
"""

from __future__ import annotations

import array
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from vmrun.block.qcow2 import (
    COMPRESSED,
    COPIED,
    HEADER,
    HEADER_V3,
    L1_RESERVED,
    L2_RESERVED,
    MAGIC,
    OFFSET_MASK,
    REFTABLE_RESERVED,
    V3_HEADER_LENGTH,
    ZERO,
    Qcow2Error,
    Qcow2Image,
    _decode_u64,
    _encode_u64,
    _Refblock,
)
from vmrun.errors import VmrunError

MAX_CHECK_CLUSTERS = 1 << 25          # a count per cluster: at most 128 MiB of counters
MAX_LINES = 20
DEFAULT_CLUSTER = 65536


@dataclass
class Scan:
    used: array.array                                  # per host cluster: times referenced
    errors: list[str] = field(default_factory=list)    # table entries that are wrong
    flags: list[str] = field(default_factory=list)     # COPIED flags the refcounts contradict
    allocated_clusters: int = 0                        # guest clusters with data (active L1)
    compressed_clusters: int = 0
    zero_clusters: int = 0


def scan(img: Qcow2Image, count: bool = True) -> Scan:
    """Count the references to every host cluster, from the tables as they are in the file
    (``count=False``: only walk the tables, for the allocation figures)."""
    cb, cs = img.cluster_bits, img.cluster_size
    nclusters = img._file_clusters
    if count and nclusters > MAX_CHECK_CLUSTERS:
        raise VmrunError(f"{img.path}: too large to check ({nclusters} clusters)")
    used = array.array("I", bytes(4 * nclusters) if count else b"")
    out = Scan(used)
    errors = out.errors

    def ref(offset: int, length: int, what: str) -> bool:
        first, last = offset >> cb, (offset + length - 1) >> cb
        if offset < 0 or last >= nclusters:
            errors.append(f"{what} at {offset:#x} lies past the end of the file")
            return False
        if count:
            for c in range(first, last + 1):
                used[c] += 1
        return True

    ref(0, cs, "header")
    ref(img.l1_offset, max(1, img.l1_size * 8), "L1 table")
    ref(img.reftable_offset, img.reftable_clusters * cs, "refcount table")
    for i, e in enumerate(img._reftable):
        off = e & ~REFTABLE_RESERVED
        if not off:
            continue
        if e & REFTABLE_RESERVED or off % cs:
            errors.append(f"refcount table entry {i} ({e:#x}) is not a cluster offset")
            continue
        ref(off, cs, f"refcount block {i}")
    l1s = [(img._l1, True)]
    for l1_off, l1_size in _snapshot_l1s(img, ref, errors):
        try:
            l1s.append((_decode_u64(img._pread(l1_off, l1_size * 8)), False))
        except OSError as e:
            errors.append(f"snapshot L1 table at {l1_off:#x}: {e.strerror}")
    stored = img.refcount
    for l1, active in l1s:
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            if e & L1_RESERVED or off % cs:
                errors.append(f"L1 entry {i} ({e:#x}) is not a valid L2 table offset")
                continue
            if not ref(off, cs, f"L2 table {i}"):
                continue
            if active and bool(e & COPIED) != (_safe(stored, off >> cb) == 1):
                out.flags.append(f"L2 table at {off:#x}: COPIED flag does not match its "
                              f"refcount {_safe(stored, off >> cb)}")
            l2 = _decode_u64(img._pread(off, cs))
            for j, entry in enumerate(l2):
                if not entry:
                    continue
                where = f"L2 table at {off:#x} entry {j}"
                if entry & COMPRESSED:
                    coff, clen = img._compressed_range(entry)
                    if active:
                        out.compressed_clusters += 1
                    ref(coff, clen, f"{where}: compressed data")
                    continue
                if entry & L2_RESERVED:
                    errors.append(f"{where} ({entry:#x}) has reserved bits set")
                    continue
                host = entry & OFFSET_MASK
                if active:
                    if entry & ZERO:
                        out.zero_clusters += 1
                    elif host:
                        out.allocated_clusters += 1
                if not host:
                    continue
                if host % cs:
                    errors.append(f"{where} ({entry:#x}) is not cluster aligned")
                    continue
                if ref(host, cs, f"{where}: data cluster") and active and \
                        bool(entry & COPIED) != (_safe(stored, host >> cb) == 1):
                    out.flags.append(f"{where}: COPIED flag does not match refcount "
                                  f"{_safe(stored, host >> cb)}")
    return out


def _safe(stored, cluster: int) -> int:
    try:
        return stored(cluster)
    except OSError:
        return -1


def _snapshot_l1s(img: Qcow2Image, ref, errors: list[str]) -> list[tuple[int, int]]:
    """(L1 offset, size) of every internal snapshot; their table clusters are counted."""
    if not img.nb_snapshots:
        return []
    head = img._pread(60, 12)
    _n, off = struct.unpack(">IQ", head)
    out = []
    pos = off
    for k in range(img.nb_snapshots):
        if pos + 40 > img._file_size:
            errors.append(f"snapshot {k} lies past the end of the file")
            break
        (l1_off, l1_size, id_len, name_len, _ds, _dn, _vm, _vs,
         extra) = struct.unpack(">QIHHIIQII", img._pread(pos, 40))
        length = 40 + extra + id_len + name_len
        length = (length + 7) & ~7
        if l1_size * 8 > 32 << 20 or l1_off % img.cluster_size or \
                l1_off + l1_size * 8 > img._file_size:
            errors.append(f"snapshot {k}: L1 table of {l1_size} entries at {l1_off:#x} is "
                          "not inside the file")
        else:
            if l1_size:
                ref(l1_off, l1_size * 8, f"snapshot {k} L1 table")
                out.append((l1_off, l1_size))
        pos += length
    if pos > off:
        ref(off, pos - off, "snapshot table")
    return out


def check_qcow2(path: str | os.PathLike[str]) -> list[str]:
    """Every problem of a qcow2 image, one line each (at most 20, then a count)."""
    path = Path(path)
    try:
        img = Qcow2Image(path, read_only=True, check_only=True)
    except VmrunError as e:
        return [str(e)]
    except OSError as e:
        return [f"{path}: {e.strerror or e}"]
    try:
        return _problems(img)
    except OSError as e:
        return [f"{path}: {e.strerror or e}"]
    finally:
        img.close()


def _problems(img: Qcow2Image) -> list[str]:
    path = img.path
    lines: list[str] = []
    if img.corrupt:
        lines.append(f"{path}: the image is marked corrupt (corrupt bit set)")
    if img.dirty:
        lines.append(f"{path}: the image was not closed cleanly (dirty bit: lazy refcounts)")
    s = scan(img)
    lines.extend(f"{path}: {e}" for e in s.errors + s.flags)
    leaks = corrupt = 0
    for c, stored, used in _mismatches(img, s.used):
        if stored < used:
            corrupt += 1
            line = (f"{path}: cluster {c:#x} has refcount {stored} but is used {used} "
                    "time(s) (corrupt)")
        else:
            leaks += 1
            line = f"{path}: leaked cluster {c:#x} (refcount {stored}, used {used})"
        lines.append(line)
    if len(lines) > MAX_LINES:
        more = len(lines) - MAX_LINES
        lines = lines[:MAX_LINES] + [f"{path}: and {more} more problems ({leaks} leaked "
                                     f"clusters, {corrupt} refcount errors in all)"]
    return lines


def _mismatches(img: Qcow2Image, used: array.array):
    """(cluster, stored, used) wherever the stored refcount differs from the count."""
    per = 1 << img._rb_bits
    n = len(used)
    for r in range(max(len(img._reftable), -(-n // per))):
        base = r * per
        block = img._refblock(r) if r < len(img._reftable) else None
        if block is None:
            for c in range(base, min(n, base + per)):
                if used[c]:
                    yield c, 0, used[c]
            continue
        entries = block.entries
        want = used[base:base + per]
        if len(want) < per:
            want.extend([0] * (per - len(want)))
        if entries.tolist() == want.tolist():
            continue
        for i, (a, b) in enumerate(zip(entries, want, strict=True)):
            if a != b:
                yield base + i, a, b


def repair_refcounts(img: Qcow2Image) -> None:
    """Store the counted refcounts (a writable open of a dirty image)."""
    s = scan(img)
    if s.errors:
        raise Qcow2Error(f"{img.path}: the image was not closed cleanly and cannot be "
                         f"repaired: {s.errors[0]}")
    cb = img.cluster_bits
    fixes = list(_mismatches(img, s.used))
    for c, _stored, want in fixes:
        r = c >> img._rb_bits
        if img._refblock(r) is None:
            if r >= len(img._reftable):
                img._grow_reftable(r)
            if img._refblock(r) is None:
                # Past everything in use: a cluster nobody references.
                off = img._end
                from vmrun.block.qcow2 import _Table

                img._rb_cache[off] = _Table(img._rb_codec.new(1 << img._rb_bits), dirty=True)
                img._reftable[r] = off
                img._reftable_dirty = True
                img._end += img.cluster_size
                img._add_meta(off >> cb)
                img._add_ref(off >> cb, 1)
        t = img._refblock(r)
        assert t is not None
        t.entries[c & ((1 << img._rb_bits) - 1)] = want
        t.dirty = True
    img._free_hint = 0
    img._sync_increments()


def check_cluster_size(path: Path, cluster_size: int) -> None:
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise VmrunError(f"{path}: cluster size {cluster_size} must be a power of two from "
                         "512 to 2M")


def create_qcow2(path: str | os.PathLike[str], size: int, *, cluster_size: int = DEFAULT_CLUSTER,
                 backing: str | None = None, backing_format: str | None = None,
                 version: int = 3) -> None:
    """Write an empty qcow2 image at ``path`` (which must not exist), laid out as qemu-img
    lays one out: header, refcount table, refcount block(s), L1 table; fsynced."""
    path = Path(path)
    check_cluster_size(path, cluster_size)
    if size <= 0 or size % 512:
        raise VmrunError(f"{path}: size {size} must be a positive multiple of 512")
    cb = cluster_size.bit_length() - 1
    cs = cluster_size
    l1_size = -(-size // (cs * (cs // 8)))
    if l1_size * 8 > 32 << 20:
        raise VmrunError(f"{path}: size {size} needs too large an L1 table for cluster size "
                         f"{cs}")
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    per_block = cs * 8 // 16
    # header, refcount table, L1, then refcount blocks for all of it.
    nblocks, reft_clusters = 1, 1
    for _ in range(64):
        total = 1 + reft_clusters + l1_clusters + nblocks
        need_blocks = -(-total // per_block)
        need_reft = max(1, -(-need_blocks * 8 // cs))
        if need_blocks == nblocks and need_reft == reft_clusters:
            break
        nblocks, reft_clusters = need_blocks, need_reft
    total = 1 + reft_clusters + l1_clusters + nblocks
    reft_off = cs
    l1_off = (1 + reft_clusters) * cs
    blocks_off = l1_off + l1_clusters * cs
    header = bytearray(cs)
    bname = os.fsencode(backing) if backing else b""
    if len(bname) > 1023:
        raise VmrunError(f"{path}: backing file name is longer than 1023 bytes")
    exts = b""
    if backing and backing_format:
        fmt = backing_format.encode()
        exts += struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt + b"\0" * (-len(fmt) % 8)
    exts += struct.pack(">II", 0, 0)
    hdr_len = V3_HEADER_LENGTH if version == 3 else HEADER.size
    backing_off = hdr_len + len(exts) if backing else 0
    if backing_off + len(bname) > cs:
        raise VmrunError(f"{path}: backing file name does not fit in a {cs}-byte cluster")
    HEADER.pack_into(header, 0, MAGIC, version, backing_off, len(bname), cb, size, 0,
                     l1_size, l1_off, reft_off, reft_clusters, 0, 0)
    if version == 3:
        HEADER_V3.pack_into(header, HEADER.size, 0, 0, 0, 4, hdr_len)
    header[hdr_len:hdr_len + len(exts)] = exts
    if backing:
        header[backing_off:backing_off + len(bname)] = bname
    reftable = array.array("Q", [blocks_off + i * cs for i in range(nblocks)])
    reftable.extend([0] * (reft_clusters * cs // 8 - nblocks))
    codec = _Refblock(16)
    blocks = b""
    for b in range(nblocks):
        entries = codec.new(per_block)
        for i in range(per_block):
            if b * per_block + i < total:
                entries[i] = 1
        blocks += codec.encode(entries)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise VmrunError(f"{path}: already exists") from None
    except OSError as e:
        raise VmrunError(f"{path}: cannot create image: {e.strerror}") from None
    try:
        os.pwrite(fd, bytes(header), 0)
        os.pwrite(fd, _encode_u64(reftable), reft_off)
        os.pwrite(fd, bytes(l1_clusters * cs), l1_off)
        os.pwrite(fd, blocks, blocks_off)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise VmrunError(f"{path}: cannot create image: {e.strerror}") from None
    os.close(fd)


def image_info(img: Qcow2Image) -> dict[str, object]:
    """What ``vmrun image info`` shows for a qcow2 image."""
    s = scan(img, count=False)
    st = os.fstat(img._fd)
    return {
        "format": f"qcow2 (version {img.version})",
        "virtual size": img.size,
        "cluster size": img.cluster_size,
        "allocated": s.allocated_clusters * img.cluster_size,
        "compressed clusters": s.compressed_clusters,
        "zero clusters": s.zero_clusters,
        "disk size": st.st_blocks * 512,
        "snapshots": img.nb_snapshots,
        "backing chain": img.chain()[1:],
    }
