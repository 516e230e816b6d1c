"""Linux native AIO (``io_submit``): what QEMU calls ``aio=native``.

With O_DIRECT, ``io_submit`` queues reads and writes with the block layer and returns at
once, so one thread can keep a whole virtqueue's worth of requests in flight and collect the
completions in batches, instead of one blocked worker thread per request handing results
back through the GIL. Completions are signalled on an eventfd (``IOCB_FLAG_RESFD``) that the
caller polls.

Only the raw backend opened with ``nocache`` uses it (buffered AIO is synchronous in Linux).
Buffers are host addresses: the caller guarantees they stay mapped until the completion.
"""

from __future__ import annotations

import errno
import os
import struct

import cffi

ffi = cffi.FFI()
ffi.cdef("""
struct iocb {
    uint64_t aio_data; uint32_t aio_key; int32_t aio_rw_flags;
    uint16_t aio_lio_opcode; int16_t aio_reqprio; uint32_t aio_fildes;
    uint64_t aio_buf; uint64_t aio_nbytes; int64_t aio_offset;
    uint64_t aio_reserved2; uint32_t aio_flags; uint32_t aio_resfd;
};
struct io_event { uint64_t data; uint64_t obj; int64_t res; int64_t res2; };
struct iovec { uint64_t iov_base; uint64_t iov_len; };
long syscall(long number, ...);
""")
_libc = ffi.dlopen(None)

SYS_IO_SETUP, SYS_IO_DESTROY, SYS_IO_GETEVENTS, SYS_IO_SUBMIT = 206, 207, 208, 209
IOCB_CMD_PREAD, IOCB_CMD_PWRITE = 0, 1
IOCB_CMD_PREADV, IOCB_CMD_PWRITEV = 7, 8
IOCB_FLAG_RESFD = 1


class AioError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ffi.errno
        raise AioError(err, f"{what}: {os.strerror(err)}")
    return ret


INLINE_IOV = 16   # iovecs per request kept in the preallocated slot (more: allocated)
# struct iocb, packed in one call: data, key, rw_flags, opcode, reqprio, fildes, buf,
# nbytes, offset, reserved2, flags, resfd.
_IOCB = struct.Struct("<QIiHhIQQqQII")
_IOV = struct.Struct("<QQ")


class AioContext:
    """One AIO context of ``depth`` requests, completions signalled on ``self.eventfd``.

    Control blocks and (up to :data:`INLINE_IOV`) iovecs live in arrays allocated once, one
    slot per request in flight, so a submission allocates nothing on the C side.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        ctx = ffi.new("unsigned long *")
        _check(_libc.syscall(ffi.cast("long", SYS_IO_SETUP), ffi.cast("long", depth), ctx),
               "io_setup")
        self.ctx = ctx[0]
        self.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._events = ffi.new("struct io_event[]", depth)
        self._cbs = ffi.new("struct iocb[]", depth)
        assert ffi.sizeof("struct iocb") == _IOCB.size
        self._cb_buf = memoryview(ffi.buffer(self._cbs)).cast("B")
        self._iovs = ffi.new("struct iovec[]", depth * INLINE_IOV)
        self._ptrs = ffi.new("struct iocb *[]", depth)
        self._cb_ptrs = [self._cbs + i for i in range(depth)]
        self._iov_ptrs = [self._iovs + i * INLINE_IOV for i in range(depth)]
        self._iov_addr = [int(ffi.cast("uintptr_t", p)) for p in self._iov_ptrs]
        self._iov_view = memoryview(ffi.buffer(self._iovs)).cast("B")
        self._free = list(range(depth - 1, -1, -1))
        self._inflight: dict[int, tuple[object, object]] = {}
        self._zero = ffi.new("long long[2]")   # struct timespec {0, 0}: do not wait
        for i in range(depth):
            cb = self._cbs[i]
            cb.aio_data = i
            cb.aio_flags = IOCB_FLAG_RESFD
            cb.aio_resfd = self.eventfd

    def submit(self, requests: list[tuple[object, int, bool, int, list[tuple[int, int]]]]
               ) -> list[object]:
        """Queue ``(token, fd, write, offset, [(host address, length), ...])`` requests.

        Returns the tokens that could not be queued (the caller serves them another way).
        """
        if not requests:
            return []
        free = self._free
        ptrs = self._ptrs
        cb_buf = self._cb_buf
        resfd = self.eventfd
        taken: list[int] = []
        refused: list[object] = []
        for token, fd, write, offset, bufs in requests:
            if not free:
                refused.append(token)
                continue
            slot = free.pop()
            extra = None
            if len(bufs) == 1:                   # one buffer: plain pread/pwrite
                buf, nbytes = bufs[0]
                op = IOCB_CMD_PWRITE if write else IOCB_CMD_PREAD
            else:
                op = IOCB_CMD_PWRITEV if write else IOCB_CMD_PREADV
                nbytes = len(bufs)
                if nbytes <= INLINE_IOV:
                    iov_buf = self._iov_view
                    base = slot * INLINE_IOV * _IOV.size
                    buf = self._iov_addr[slot]
                else:
                    extra = ffi.new("struct iovec[]", nbytes)
                    iov_buf = memoryview(ffi.buffer(extra)).cast("B")
                    base = 0
                    buf = int(ffi.cast("uintptr_t", extra))
                for j, (addr, length) in enumerate(bufs):
                    _IOV.pack_into(iov_buf, base + j * _IOV.size, addr, length)
            _IOCB.pack_into(cb_buf, slot * _IOCB.size, slot, 0, 0, op, 0, fd, buf, nbytes,
                            offset, 0, IOCB_FLAG_RESFD, resfd)
            ptrs[len(taken)] = self._cb_ptrs[slot]
            self._inflight[slot] = (token, extra)
            taken.append(slot)
        if not taken:
            return refused
        done = _libc.syscall(ffi.cast("long", SYS_IO_SUBMIT), ffi.cast("unsigned long", self.ctx),
                             ffi.cast("long", len(taken)), ptrs)
        if done < 0:
            err = ffi.errno
            if err not in (errno.EAGAIN, errno.EINVAL, errno.EBADF, errno.ENOSYS):
                for slot in taken:
                    self._release(slot)
                raise AioError(err, f"io_submit: {os.strerror(err)}")
            done = 0
        for slot in taken[done:]:
            refused.append(self._release(slot))
        return refused

    def _release(self, slot: int) -> object:
        token, _extra = self._inflight.pop(slot)
        self._free.append(slot)
        return token

    def reap(self) -> list[tuple[object, int]]:
        """Completed requests as ``(token, result)``: bytes moved, or ``-errno``."""
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
        out: list[tuple[object, int]] = []
        while self._inflight:
            got = _check(_libc.syscall(ffi.cast("long", SYS_IO_GETEVENTS),
                                       ffi.cast("unsigned long", self.ctx), ffi.cast("long", 0),
                                       ffi.cast("long", self.depth), self._events, self._zero),
                         "io_getevents")
            for i in range(got):
                ev = self._events[i]
                if ev.data in self._inflight:
                    out.append((self._release(ev.data), ev.res))
            if got < self.depth:
                # Drained: a completion after the eventfd read above signals it again.
                break
        return out

    @property
    def pending(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        """Waits for requests in flight (io_destroy does), then frees the context."""
        if self.ctx:
            _libc.syscall(ffi.cast("long", SYS_IO_DESTROY), ffi.cast("unsigned long", self.ctx))
            self.ctx = 0
            os.close(self.eventfd)
        self._inflight.clear()
