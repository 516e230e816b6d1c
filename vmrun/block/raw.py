"""A raw disk image: a regular file or a host block device, byte for byte the guest's disk.

Guest I/O goes straight from guest RAM to the file with ``preadv``/``pwritev``. With
``nocache`` the file is opened ``O_DIRECT``; the kernel then insists that buffer addresses,
lengths and the file offset are multiples of the device's logical block size. Guest buffers
usually are; when one is not, that single request goes through an aligned bounce buffer
instead of failing.

The image is locked with ``flock`` (exclusive for read-write, shared for read-only), so two VMs,
or two devices of one VM, can never write the same image.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from pathlib import Path

import cffi

from vmrun.block.backend import (
    BlockBackend,
    check_range,
    check_sector_sizes,
    preadv_full,
    pwritev_full,
    write_zeros,
)
from vmrun.core.dma import Buffers, as_bytes_view, buffers_len, copy_in, copy_out
from vmrun.errors import VmrunError

_ffi = cffi.FFI()
_ffi.cdef("int fallocate(int fd, int mode, int64_t offset, int64_t len);")
_libc = _ffi.dlopen(None)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKSSZGET = 0x1268
PAGE = mmap.PAGESIZE


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """libc ``fallocate`` (``os.posix_fallocate`` cannot punch holes); OSError on failure."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = _ffi.errno
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the range's blocks back to the filesystem; it reads as zeros afterwards."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def probe_punch_hole(fd: int, file_end: int) -> bool:
    """Whether the filesystem punches holes: try one past end of file, where it changes nothing."""
    try:
        punch_hole(fd, file_end + PAGE, PAGE)
    except OSError:
        return False
    return True


def buffer_address(buf: memoryview) -> int:
    """The address of a buffer's first byte, to check O_DIRECT alignment."""
    ptr = _ffi.from_buffer(buf)
    try:
        return int(_ffi.cast("uintptr_t", ptr))
    finally:
        _ffi.release(ptr)


def lock_image(fd: int, path: object, read_only: bool) -> None:
    """flock the image: shared for readers, exclusive for a writer; one-line error if taken."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise VmrunError(f"{path}: image is in use by another process") from None


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for the one-line refusals."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_kind(path: Path, mode: int, what: str, allow_block: bool) -> None:
    if stat.S_ISREG(mode) or (allow_block and stat.S_ISBLK(mode)):
        return
    allowed = "a regular file or a block device" if allow_block else "a regular file"
    raise VmrunError(f"{path}: {what} is {file_kind(mode)}, not {allowed}")


def open_image_file(path: Path, flags: int, what: str = "disk image", *,
                    allow_block: bool = True, nofollow: bool = False) -> int:
    """Open one file of an image; every failure is a one-line user error naming the file.

    Only a regular file (or, with ``allow_block``, a block device) is accepted: the type is
    checked with ``stat`` before opening, so a FIFO, socket or character device is never even
    opened, and again with ``fstat`` on the descriptor (opened ``O_NONBLOCK``, so a file that
    changed type in between cannot block us). With ``nofollow`` a symlink is refused too (the
    LUT and segments of a sparse/split image must be its own files).
    """
    try:
        st = os.lstat(path) if nofollow else os.stat(path)
    except FileNotFoundError:
        raise VmrunError(f"{path}: no such {what}") from None
    except OSError as e:
        raise VmrunError(f"{path}: cannot open {what}: {e.strerror}") from None
    if nofollow and stat.S_ISLNK(st.st_mode):
        raise VmrunError(f"{path}: {what} is a symlink (the files of a split or sparse image "
                         "must not be links to other files)")
    _refuse_kind(path, st.st_mode, what, allow_block)
    extra = os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags | extra)
    except FileNotFoundError:
        raise VmrunError(f"{path}: no such {what}") from None
    except OSError as e:
        if e.errno == errno.EINVAL and flags & os.O_DIRECT:
            raise VmrunError(f"{path}: the filesystem does not support nocache (O_DIRECT)") \
                from None
        if e.errno == errno.ELOOP and nofollow:
            raise VmrunError(f"{path}: {what} is a symlink (the files of a split or sparse "
                             "image must not be links to other files)") from None
        if e.errno == errno.EISDIR:
            raise VmrunError(f"{path}: {what} is a directory, not a regular file") from None
        raise VmrunError(f"{path}: cannot open {what}: {e.strerror}") from None
    try:
        _refuse_kind(path, os.fstat(fd).st_mode, what, allow_block)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _host_block_size(fd: int, st: os.stat_result) -> int:
    """The logical block size O_DIRECT must respect: the device's, or a safe guess (a page)."""
    if stat.S_ISBLK(st.st_mode):
        return struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0)))[0]
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    try:
        real = dev.resolve(strict=True)
        for d in (real, real.parent):  # a partition keeps its queue/ in the whole disk
            q = d / "queue" / "logical_block_size"
            if q.exists():
                return int(q.read_text())
    except (OSError, ValueError):
        pass
    return max(PAGE, st.st_blksize)


class RawFile(BlockBackend):
    """A raw image file or block device, read and written in place."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False,
                 nocache: bool = False, sync: bool = False,
                 sector_size: tuple[int, int] = (512, 512), discard: bool = True,
                 image_part: bool = False) -> None:
        """``image_part``: the file is a segment of a split image (a regular file, no symlink)."""
        self.path = Path(path)
        try:
            self.logical_sector_size, self.physical_sector_size = check_sector_sizes(*sector_size)
        except ValueError as e:
            raise VmrunError(f"{self.path}: {e}") from None
        self.read_only = read_only
        self.nocache = nocache
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if sync:
            flags |= os.O_SYNC
        if nocache:
            flags |= os.O_DIRECT
        what = "segment file" if image_part else "disk image"
        self._fd = open_image_file(self.path, flags, what, allow_block=not image_part,
                                   nofollow=image_part)
        self._buffered_fd = -1
        try:
            st = os.fstat(self._fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            lock_image(self._fd, self.path, read_only)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
            if self.size < self.logical_sector_size and not image_part:
                raise VmrunError(f"{self.path}: image is {self.size} bytes, smaller than one "
                                 f"{self.logical_sector_size}-byte sector")
            self._read_limit = -(-self.size // self.logical_sector_size) * self.logical_sector_size
            self._align = 1
            if nocache:
                self._align = max(_host_block_size(self._fd, st), self.logical_sector_size)
                if self.size % max(self._align, PAGE):
                    # O_DIRECT cannot touch the final partial block without growing the file.
                    self._buffered_fd = open_image_file(self.path, flags & ~os.O_DIRECT, what,
                                                        allow_block=not image_part,
                                                        nofollow=image_part)
            self.supports_discard = (discard and not read_only and not self.is_block_device
                                     and probe_punch_hole(self._fd, self.size))
        except BaseException:
            self.close()
            raise
        self._rmw_lock = threading.Lock()

    # -- data path ---------------------------------------------------------------------

    def direct_io(self) -> tuple[int, int] | None:
        """``(O_DIRECT fd, alignment)`` for callers that queue their own I/O on the file
        (native AIO), or None when the file is not opened with ``nocache``."""
        return (self._fd, self._align) if self.nocache else None

    def readv(self, offset: int, bufs: Buffers) -> int:
        total = buffers_len(bufs)
        check_range(self.path, offset, total, self._read_limit)
        if self.nocache:
            return self._direct(offset, bufs, total, write=False)
        return preadv_full(self._fd, offset, bufs)

    def writev(self, offset: int, bufs: Buffers) -> int:
        self._check_writable()
        total = buffers_len(bufs)
        check_range(self.path, offset, total, self.size)
        if self.nocache:
            return self._direct(offset, bufs, total, write=True)
        return pwritev_full(self._fd, offset, bufs)

    def _direct(self, offset: int, bufs: Buffers, total: int, write: bool) -> int:
        """O_DIRECT I/O: in place when aligned, else through a bounce buffer."""
        if -(-(offset + total) // self._align) * self._align > self.size \
                and self._buffered_fd >= 0:
            fd = self._buffered_fd
            return pwritev_full(fd, offset, bufs) if write else preadv_full(fd, offset, bufs)
        try:
            return self._direct_once(offset, bufs, total, write)
        except OSError as e:
            # Our guess of the device's block size was too small: a page is always enough.
            if e.errno != errno.EINVAL or self._align >= PAGE:
                raise
            self._align = PAGE
            return self._direct_once(offset, bufs, total, write)

    def _direct_once(self, offset: int, bufs: Buffers, total: int, write: bool) -> int:
        if self._aligned(offset, bufs):
            if write:
                return pwritev_full(self._fd, offset, bufs)
            return preadv_full(self._fd, offset, bufs)
        a = self._align
        start = offset // a * a
        end = -(-(offset + total) // a) * a
        bounce = mmap.mmap(-1, end - start)  # page aligned, hence aligned for O_DIRECT
        view = memoryview(bounce)
        if not write:
            preadv_full(self._fd, start, [view])
            copy_out(view[offset - start:offset - start + total], bufs)
            return total
        if start == offset and end == offset + total:
            copy_in(bufs, view)
            pwritev_full(self._fd, start, [view])
            return total
        # Read-modify-write of the partial blocks at either end. Two such writes to one block
        # (different guest sectors in one host block) must not interleave, hence the lock.
        with self._rmw_lock:
            preadv_full(self._fd, start, [view])
            copy_in(bufs, view, offset - start)
            pwritev_full(self._fd, start, [view])
        return total

    def _aligned(self, offset: int, bufs: Buffers) -> bool:
        a = self._align
        if offset % a:
            return False
        for b in bufs:
            mv = as_bytes_view(b)
            if len(mv) % a or (len(mv) and buffer_address(mv) % a):
                return False
        return True

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self._fd)

    # -- discard and zeroing -----------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        check_range(self.path, offset, length, self.size)
        if not self.supports_discard:
            raise OSError(errno.EOPNOTSUPP, f"{self.path}: discard is not supported")
        if length:
            punch_hole(self._fd, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero a range by the cheapest means the host offers, falling back to writing zeros."""
        self._check_writable()
        check_range(self.path, offset, length, self.size)
        if not length:
            return
        if unmap and self.supports_discard:
            punch_hole(self._fd, offset, length)
            return
        try:
            fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                raise
        write_zeros(self, offset, length)

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(errno.EROFS, f"{self.path}: disk is read-only")

    def close(self) -> None:
        for name in ("_fd", "_buffered_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def __repr__(self) -> str:
        return f"RawFile({str(self.path)!r}, size={self.size}, read_only={self.read_only})"
