"""The contract every disk image backend keeps, and the vectored-I/O helpers they share.

Disk emulations (virtio-blk, later AHCI) hand a backend a list of ``memoryview`` slices of guest
RAM; the backend moves bytes straight between those slices and the image with
``os.preadv``/``os.pwritev``, so a request never goes through an intermediate copy. A backend
either transfers every byte or raises ``OSError``; the device turns that into an I/O error
status for the guest, never a crash of the VMM.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from types import TracebackType

from vmrun.core.dma import CHUNK, ZEROS, Buffers, as_bytes_view, zero_fill

# The kernel refuses a preadv/pwritev with more iovecs than this (EINVAL), so we batch.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
MIN_SECTOR = 512
MAX_SECTOR = 65536


class BlockBackend(ABC):
    """What a disk emulation needs from an image: sized, vectored, flushable, discardable.

    ``size`` is exact in bytes and may be odd; devices expose ``size // logical_sector_size``
    sectors. ``readv``/``writev`` are safe to call from several worker threads at once.
    """

    size: int
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    read_only: bool = False
    #: Set by the backend's constructor from what the image supports and what the user asked
    #: (``discard=False`` turns it off); never changed afterwards.
    supports_discard: bool = False

    def direct_io(self) -> tuple[int, int] | None:
        """``(fd, alignment)`` when aligned reads and writes may be queued straight on an
        O_DIRECT file descriptor (native AIO, :mod:`vmrun.block.queue`), else None: then every
        request goes through :meth:`readv`/:meth:`writev` on a worker thread."""
        return None

    def direct_map(self, offset: int, length: int, write: bool) -> int | None:
        """Where guest bytes ``offset .. offset + length`` lie on the :meth:`direct_io`
        descriptor, when they lie there in one piece and (for ``write``) may be written in
        place; None sends the request through :meth:`readv`/:meth:`writev` instead. A raw
        image is the identity; a qcow2 image maps through its tables."""
        return offset

    @abstractmethod
    def readv(self, offset: int, bufs: Buffers) -> int:
        """Fill ``bufs`` in order from ``offset``; return the byte count (always all of it)."""

    @abstractmethod
    def writev(self, offset: int, bufs: Buffers) -> int:
        """Write ``bufs`` in order at ``offset``; return the byte count (always all of it)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every acknowledged write durable (fsync), so it survives a VMM crash."""

    @abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Tell the image the range is unused; it reads back as zeros afterwards."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeros; with ``unmap`` the space may be given back too."""

    @abstractmethod
    def close(self) -> None:
        """Release files and locks. Calling it twice is harmless."""

    def __enter__(self) -> BlockBackend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def check_sector_sizes(logical: int, physical: int) -> tuple[int, int]:
    """Validate a (logical, physical) pair; ValueError says what is wrong."""
    for name, value in (("logical", logical), ("physical", physical)):
        if value < MIN_SECTOR or value > MAX_SECTOR or value & (value - 1):
            raise ValueError(f"{name} sector size {value} must be a power of two between "
                             f"{MIN_SECTOR} and {MAX_SECTOR}")
    if logical > physical:
        raise ValueError(f"logical sector size {logical} is larger than physical {physical}")
    return logical, physical


def parse_sectorsize(text: str) -> tuple[int, int]:
    """Parse bhyve's ``sectorsize=L[/P]`` value ("512", "512/4096") into (logical, physical)."""
    parts = text.strip().split("/")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"sector size {text!r} is not LOGICAL[/PHYSICAL], e.g. 512 or 512/4096")
    logical = int(parts[0])
    physical = int(parts[1]) if len(parts) == 2 else logical
    return check_sector_sizes(logical, physical)


def check_range(path: object, offset: int, length: int, limit: int) -> None:
    """Refuse a request outside the disk: the device reports it as an I/O error."""
    if offset < 0 or length < 0 or offset + length > limit:
        raise OSError(errno.EINVAL, f"{path}: request {offset}+{length} is outside the disk "
                                    f"({limit} bytes)")


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a buffer list (after a partial transfer)."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def preadv_full(fd: int, offset: int, bufs: Buffers) -> int:
    """``preadv`` until every buffer is full; whatever lies past end of file reads as zeros."""
    pending = [as_bytes_view(b) for b in bufs if b.nbytes]
    total = sum(len(b) for b in pending)
    done = 0
    while pending:
        batch = pending[:IOV_MAX]
        want = sum(len(b) for b in batch)
        n = os.preadv(fd, batch, offset + done)
        done += n
        pending = _advance(pending, n)
        # Regular files and block devices only come up short at end of file.
        if n < want and (n == 0 or os.lseek(fd, 0, os.SEEK_END) <= offset + done):
            zero_fill(pending)
            break
    return total


def pwritev_full(fd: int, offset: int, bufs: Buffers) -> int:
    """``pwritev`` until every byte is written (a short write is retried, not ignored)."""
    pending = [as_bytes_view(b) for b in bufs if b.nbytes]
    total = sum(len(b) for b in pending)
    done = 0
    while pending:
        n = os.pwritev(fd, pending[:IOV_MAX], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += n
        pending = _advance(pending, n)
    return total


def write_zeros(backend: BlockBackend, offset: int, length: int) -> None:
    """The slow but universal way to zero a range: write zero blocks through ``writev``."""
    zero = memoryview(ZEROS)
    end = offset + length
    while offset < end:
        n = min(CHUNK, end - offset)
        backend.writev(offset, [zero[:n]])
        offset += n
