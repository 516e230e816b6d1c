"""The block request queue the disk emulations share (virtio-blk today, AHCI next).

A device submits requests — read, write, flush, discard, write-zeroes — each with a completion
callback, and gets every completion back on the devices' event loop, exactly once, with the
result: bytes moved, or ``-errno``. How a request is carried out is the queue's business:

- aligned reads and writes on a backend that offers ``direct_io()`` (an O_DIRECT raw image,
  or the allocated clusters of an O_DIRECT qcow2 image, found by ``direct_map()``) go out as
  Linux native AIO, straight between guest RAM and the file, gathered into one
  ``io_submit`` per :meth:`BlockQueue.submit` (call it once after taking a batch of requests
  off the guest's ring); the kernel signals completions on an eventfd the loop watches;
- everything else runs on a small pool of worker threads (bhyve's block_if uses 8) with
  ``preadv``/``pwritev`` on the guest buffers; a worker posts the completion to the loop.

In-flight accounting lives here and only here: a request counts from submission until its
completion is handed to the loop, whatever path it took (an AIO request the kernel refused
or failed with EINVAL goes to the workers without leaving the count). :meth:`drain` waits
until nothing is in flight — a device's reset calls it so that no host I/O touches guest
memory the driver has taken back — and it makes progress by itself (it reaps AIO
completions), so it never depends on the loop thread and cannot stall a vCPU beyond the I/O
it waits for.

A device that reports completions in batches (AHCI's Set Device Bits FIS, one interrupt for
many NCQ tags) passes ``batch_done``: it runs on the loop after the completions of one AIO
reap, and after each completion a worker delivered.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from vmrun.block.aio import AioContext, AioError
from vmrun.block.backend import BlockBackend

if TYPE_CHECKING:
    from vmrun.core.dma import SgList
    from vmrun.core.eventloop import EventLoop, Owner

log = logging.getLogger("vmrun.block")

READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = "read", "write", "flush", "discard", "write-zeroes"
Done = Callable[[int], object]


class BlockQueue:
    """Requests against one backend; completions on ``loop`` (or inline without one)."""

    def __init__(self, backend: BlockBackend, loop: EventLoop | None, *, depth: int = 256,
                 workers: int = 8, owner: Owner | None = None, name: str = "blk",
                 batch_done: Callable[[], object] | None = None) -> None:
        self.backend = backend
        self.batch_done = batch_done
        self.loop = loop
        self.owner = owner
        self.name = name
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-io")
        self._count_lock = threading.Lock()
        self._inflight = 0
        self._batch: list[tuple[object, int, bool, int, list[tuple[int, int]]]] = []
        self._reap_lock = threading.Lock()
        self.submitted = 0
        self.aio_submitted = 0
        self.aio: AioContext | None = None
        self._aio_source = None
        self._map = backend.direct_map
        direct = backend.direct_io()
        if direct is not None:
            try:
                self.aio = AioContext(depth)
                self._direct_fd, self._align = direct
            except AioError as e:   # no AIO in this kernel: the workers do it all
                log.info("%s: native AIO unavailable (%s): using threads", name, e)
        if self.aio is not None and loop is not None:
            self._aio_source = loop.add(self.aio.eventfd, self._aio_ready, owner)

    # -- accounting ----------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return self._inflight

    def _start(self) -> None:
        with self._count_lock:
            self._inflight += 1
        self.submitted += 1

    def _deliver(self, done: Done, result: int, on_loop: bool = False) -> None:
        """Hand a completion to the loop; the request stops counting now."""
        with self._count_lock:
            self._inflight -= 1
        loop = self.loop
        if self.batch_done is not None:
            done = self._then_batch_done(done)
        if on_loop or loop is None or loop.on_loop_thread:
            done(result)
        else:
            loop.call_soon(done, result, owner=self.owner)

    def _then_batch_done(self, done: Done) -> Done:
        batch_done = self.batch_done
        assert batch_done is not None

        def both(result: int) -> None:
            done(result)
            batch_done()
        return both

    # -- requests ------------------------------------------------------------------------
    def read(self, offset: int, sg: SgList, done: Done) -> None:
        self._rw(offset, sg, done, write=False)

    def write(self, offset: int, sg: SgList, done: Done) -> None:
        if self.backend.read_only:
            self._start()
            self._deliver(done, -errno.EROFS)
            return
        self._rw(offset, sg, done, write=True)

    def flush(self, done: Done) -> None:
        self._work(done, self.backend.flush)

    def discard(self, offset: int, length: int, done: Done) -> None:
        self._work(done, self.backend.discard, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        self._work(done, self.backend.write_zeroes, offset, length, unmap)

    def _rw(self, offset: int, sg: SgList, done: Done, write: bool) -> None:
        self._start()
        if self.aio is not None and sg.nbytes and offset % self._align == 0:
            iov = sg.iovecs(self._align)
            if iov is not None:
                host = self._map(offset, sg.nbytes, write)
                if host is not None:
                    self._batch.append(((done, sg, write, offset), self._direct_fd, write,
                                        host, iov))
                    return
        self._to_worker(done, sg, write, offset)

    def _to_worker(self, done: Done, sg: SgList, write: bool, offset: int) -> None:
        op = self.backend.writev if write else self.backend.readv
        expected = sg.nbytes
        self.pool.submit(self._run, done, expected, op, offset, sg.views)

    def _work(self, done: Done, fn: Callable[..., object], *args: object) -> None:
        self._start()
        self.pool.submit(self._run, done, 0, fn, *args)

    def _run(self, done: Done, result: int, fn: Callable[..., object], *args: object) -> None:
        """On a worker: one backend call; every outcome becomes one completion."""
        try:
            fn(*args)
        except OSError as e:
            log.warning("%s: I/O error: %s", self.name, e)
            result = -(e.errno or errno.EIO)
        except Exception as e:   # a backend bug must not lose the request
            log.error("%s: %s failed: %r", self.name, getattr(fn, "__name__", fn), e)
            result = -errno.EIO
        self._deliver(done, result)

    def submit(self) -> None:
        """Send the AIO requests gathered since the last call in one ``io_submit``."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        assert self.aio is not None
        self.aio_submitted += len(batch)
        try:
            refused = self.aio.submit(batch)
        except AioError as e:
            log.warning("%s: io_submit: %s: using threads", self.name, e)
            refused = [b[0] for b in batch]
        for done, sg, write, offset in refused:   # type: ignore[misc]
            self._to_worker(done, sg, write, offset)

    # -- AIO completions -------------------------------------------------------------------
    def _aio_ready(self, _fd: int) -> None:
        self._reap(on_loop=True)

    def _reap(self, on_loop: bool = False) -> None:
        aio = self.aio
        if aio is None:
            return
        with self._reap_lock:
            events = aio.reap()
        if not events:
            return
        finished = []
        for (done, sg, write, offset), res in events:    # type: ignore[misc]
            if res == -errno.EINVAL:
                # The O_DIRECT alignment guess was too small: the workers re-align.
                self._to_worker(done, sg, write, offset)
                continue
            if 0 <= res != sg.nbytes:
                log.warning("%s: short transfer %d of %d", self.name, res, sg.nbytes)
                res = -errno.EIO
            finished.append((done, res))
        with self._count_lock:              # one update for the whole batch
            self._inflight -= len(finished)
        loop = self.loop
        if on_loop or loop is None or loop.on_loop_thread:
            for done, res in finished:
                done(res)
            if self.batch_done is not None:
                self.batch_done()
        else:
            for done, res in finished:
                loop.call_soon(done, res, owner=self.owner)
            if self.batch_done is not None:
                loop.call_soon(self.batch_done, owner=self.owner)

    # -- lifetime --------------------------------------------------------------------------
    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is in flight; True when it got there within ``timeout``."""
        self.submit()
        deadline = _now() + timeout
        while self._inflight:
            if self.aio is not None and self.aio.pending:
                self._reap()
                if not self._inflight:
                    break
            if _now() > deadline:
                log.warning("%s: %d requests still in flight", self.name, self._inflight)
                return False
            time.sleep(0.001)      # a reset is rare; the completion path stays lock-cheap
        return True

    def close(self) -> None:
        self.drain()
        if self._aio_source is not None:
            self._aio_source.remove()
            self._aio_source = None
        if self.aio is not None:
            self.aio.close()
            self.aio = None
        self.pool.shutdown(wait=True)


_now = time.monotonic


__all__ = ["BlockQueue", "READ", "WRITE", "FLUSH", "DISCARD", "WRITE_ZEROES"]
