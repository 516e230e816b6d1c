"""virtio-blk (virtio spec 5.2): a block device over any :class:`vmrun.block.BlockBackend`.

Requests are taken off the queue on the transport's I/O thread. On a raw image opened with
``nocache`` (O_DIRECT), reads and writes go out in batches through Linux native AIO
(``io_submit``, QEMU's ``aio=native``) straight from/into guest RAM, and their completions are
collected on that same thread (``io_fds``/``io_ready``). Everything else (flush, discard,
GET_ID, unaligned buffers, other backends) runs on a small pool of worker threads (bhyve's
block_if uses 8) with ``preadv``/``pwritev`` on memoryviews of the guest mapping. No copies
either way. Every request is checked: a header of 16 readable bytes, a 1-byte writable status
at the end, data lengths that are whole sectors, sectors inside the disk; a malformed request
gets VIRTIO_BLK_S_IOERR (or UNSUPP), a malformed chain marks the device DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from vmrun.block.aio import AioContext, AioError
from vmrun.core.memory import GuestMemoryError
from vmrun.core.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice
from vmrun.core.virtio.queue import DescriptorChain

log = logging.getLogger("vmrun.virtio-blk")

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
SECTOR = 512
SEG_MAX = 126
SIZE_MAX = 1 << 20
MAX_DISCARD_SECTORS = (1 << 32) - 1 & ~7
MAX_DISCARD_SEG = 32


class RequestError(Exception):
    """A request the device answers with ``status`` (IOERR or UNSUPP)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class VirtioBlk(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    pci_class = 0x018000
    name = "virtio-blk"

    def __init__(self, backend, serial: str = "", workers: int = 8,
                 queue_size: int = 256) -> None:
        self.backend = backend
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.queue_sizes = [queue_size]
        self.read_only = backend.read_only
        self.sectors = backend.size // SECTOR
        self.features = (VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_BLK_SIZE
                         | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY)
        if self.read_only:
            self.features |= VIRTIO_BLK_F_RO
        elif backend.supports_discard:
            self.features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virtio-blk")
        self.requests = 0
        self.aio_requests = 0
        self._inflight = 0
        self._idle = threading.Condition()
        self.aio: AioContext | None = None
        direct = getattr(backend, "direct_io", lambda: None)()
        if direct is not None:
            try:
                self.aio = AioContext(queue_size)
                self._direct_fd, self._direct_align = direct
            except AioError as e:   # no AIO in this kernel: the worker threads do it all
                log.info("%s: native AIO unavailable (%s): using threads", self.name, e)

    # -- configuration -------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        logical = self.backend.logical_sector_size
        physical = self.backend.physical_sector_size
        exp = (physical // logical).bit_length() - 1
        cfg = struct.pack("<QIIHBBI", self.sectors, SIZE_MAX, SEG_MAX, 0, 0, 0, logical)
        cfg += struct.pack("<BBHI", exp, 0, max(1, physical // logical), 0)
        cfg += struct.pack("<BBH", 1, 0, 1)              # writeback cache, num_queues
        cfg += struct.pack("<III", MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
                           max(1, physical // SECTOR))
        cfg += struct.pack("<IIB3x", MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)
        return cfg

    # -- requests --------------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        q = self.queues[index]
        batch = []
        while True:
            with q.lock:
                chain = q.pop()
            if chain is None:
                break
            self.requests += 1
            self._started(1)
            req = self._aio_request(index, chain) if self.aio is not None else None
            if req is None:
                self.pool.submit(self._serve, index, chain)
            else:
                batch.append(req)
        if batch:
            assert self.aio is not None
            self.aio_requests += len(batch)
            for token in self.aio.submit(batch):
                self.pool.submit(self._serve, token[0], token[1])   # type: ignore[index]

    # -- requests in flight (a reset waits for them) ---------------------------------------
    def _started(self, n: int) -> None:
        with self._idle:
            self._inflight += n

    def _finished(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def reset(self) -> None:
        """Drain: every request in flight finishes (its completion is dropped by the
        transport) before the driver can set up new rings."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._inflight == 0, timeout=30):
                log.warning("%s: %d requests still in flight after a reset", self.name,
                            self._inflight)

    # -- native AIO: plain aligned reads and writes ---------------------------------------
    def _aio_request(self, index: int, chain: DescriptorChain):
        """An AIO request for a well-formed, aligned read or write; None sends the chain to
        the worker threads (which also give malformed requests their error status)."""
        try:
            status_addr, _ = self._status_slot(chain)
            rtype, sector, out_data = self._header(chain)
        except (RequestError, GuestMemoryError, struct.error):
            return None
        if rtype == VIRTIO_BLK_T_IN:
            bufs = self._data_in(chain)
        elif rtype == VIRTIO_BLK_T_OUT and not self.read_only:
            bufs = out_data
        else:
            return None
        align = self._direct_align
        offset = sector * SECTOR
        total = 0
        iov = []
        try:
            for gpa, length in bufs:
                if not length:
                    continue
                hva = self.mem.host_address_of(gpa, length)
                if hva % align or length % align:
                    return None
                iov.append((hva, length))
                total += length
        except GuestMemoryError:
            return None
        if not iov or offset % align or sector + total // SECTOR > self.sectors or \
                offset + total > self.backend.size:
            return None
        # (queue, chain, status byte, bytes to move, bytes the device writes into the chain)
        token = (index, chain, status_addr, total, total if rtype == VIRTIO_BLK_T_IN else 0)
        return token, self._direct_fd, rtype == VIRTIO_BLK_T_OUT, offset, iov

    def io_fds(self) -> list[int]:
        return [self.aio.eventfd] if self.aio is not None else []

    def io_ready(self, fd: int) -> None:
        """AIO completions, on the transport's I/O thread: status byte, used ring."""
        aio = self.aio
        if aio is None:
            return
        for (index, chain, status_addr, expected, n), res in aio.reap():
            if res == -errno.EINVAL:
                # The O_DIRECT alignment guess was too small: the threads re-align.
                self.pool.submit(self._serve, index, chain)
                continue
            self._finish_aio(index, chain, status_addr, expected, n, res)

    def _finish_aio(self, index: int, chain: DescriptorChain, status_addr: int, expected: int,
                    n: int, res: int) -> None:
        try:
            status = VIRTIO_BLK_S_OK
            if res != expected:
                log.warning("%s: I/O error: %s", self.name,
                            os.strerror(-res) if res < 0 else f"short transfer {res}")
                status, n = VIRTIO_BLK_S_IOERR, 0
            try:
                self.mem.write(status_addr, bytes([status]))
            except GuestMemoryError:
                self.transport.broken(f"status byte of head {chain.head} left guest RAM")
                return
            self.transport.complete(index, chain.head, n + 1)
        finally:
            self._finished()

    def _serve(self, index: int, chain: DescriptorChain) -> None:
        try:
            self._serve_one(index, chain)
        finally:
            self._finished()

    def _serve_one(self, index: int, chain: DescriptorChain) -> None:
        try:
            status_addr, written = self._status_slot(chain)
        except RequestError as e:
            # No place to put a status: the chain itself is broken.
            self.transport.broken(f"request at head {chain.head}: {e}")
            return
        try:
            n = self._execute(chain)
            status = VIRTIO_BLK_S_OK
        except RequestError as e:
            log.debug("request at head %d: %s", chain.head, e)
            status, n = e.status, 0
        except OSError as e:
            log.warning("%s: I/O error: %s", self.name, e)
            status, n = VIRTIO_BLK_S_IOERR, 0
        try:
            self.mem.write(status_addr, bytes([status]))
        except GuestMemoryError:
            self.transport.broken(f"status byte of head {chain.head} left guest RAM")
            return
        self.transport.complete(index, chain.head, n + written)

    @staticmethod
    def _data_in(chain: DescriptorChain) -> list[tuple[int, int]]:
        """The device-writable buffers without the trailing status byte."""
        bufs = list(chain.writable)
        addr, length = bufs[-1]
        if length > 1:
            bufs[-1] = (addr, length - 1)
        else:
            bufs.pop()
        return bufs

    @staticmethod
    def _status_slot(chain: DescriptorChain) -> tuple[int, int]:
        if not chain.writable or chain.writable[-1][1] < 1:
            raise RequestError(VIRTIO_BLK_S_IOERR, "no writable status byte")
        if chain.readable_len < 16:
            raise RequestError(VIRTIO_BLK_S_IOERR, "header shorter than 16 bytes")
        addr, length = chain.writable[-1]
        return addr + length - 1, 1

    def _header(self, chain: DescriptorChain) -> tuple[int, int, list[tuple[int, int]]]:
        """(type, sector, data buffers after the header) from the readable part."""
        raw = bytearray()
        rest: list[tuple[int, int]] = []
        for addr, length in chain.readable:
            if len(raw) < 16:
                take = min(16 - len(raw), length)
                raw += self.mem.read(addr, take)
                if take < length:
                    rest.append((addr + take, length - take))
            else:
                rest.append((addr, length))
        rtype, _reserved, sector = struct.unpack("<IIQ", raw)
        return rtype, sector, rest

    def _execute(self, chain: DescriptorChain) -> int:
        rtype, sector, out_data = self._header(chain)
        in_data = self._data_in(chain)
        if rtype == VIRTIO_BLK_T_IN:
            n = sum(ln for _, ln in in_data)
            self._check_range(sector, n)
            self.backend.readv(sector * SECTOR, self._views(in_data))
            return n
        if rtype == VIRTIO_BLK_T_OUT:
            if self.read_only:
                raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            n = sum(ln for _, ln in out_data)
            self._check_range(sector, n)
            self.backend.writev(sector * SECTOR, self._views(out_data))
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.backend.flush()
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            total = sum(ln for _, ln in in_data)
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:max(0, total)]
            off = 0
            for a, ln in in_data:
                chunk = ident[off:off + ln]
                if not chunk:
                    break
                self.mem.write(a, chunk)
                off += len(chunk)
            return off
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            if self.read_only:
                raise RequestError(VIRTIO_BLK_S_IOERR, "discard on a read-only disk")
            if not self.backend.supports_discard:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard not supported")
            data = b"".join(self.mem.read(a, ln) for a, ln in out_data)
            if len(data) % 16 or not data or len(data) // 16 > MAX_DISCARD_SEG:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"discard payload of {len(data)} bytes")
            for off in range(0, len(data), 16):
                start, count, flags = struct.unpack_from("<QII", data, off)
                self._check_range(start, count * SECTOR)
                if rtype == VIRTIO_BLK_T_DISCARD:
                    self.backend.discard(start * SECTOR, count * SECTOR)
                else:
                    self.backend.write_zeroes(start * SECTOR, count * SECTOR, bool(flags & 1))
            return 0
        raise RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {rtype}")

    def _check_range(self, sector: int, nbytes: int) -> None:
        if nbytes % SECTOR:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"{nbytes} bytes is not whole sectors")
        if sector + nbytes // SECTOR > self.sectors:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"sectors {sector}+{nbytes // SECTOR} beyond "
                               f"the end of the disk ({self.sectors})")

    def _views(self, bufs: list[tuple[int, int]]) -> list[memoryview]:
        return [self.mem.view(a, n) for a, n in bufs if n]

    def close(self) -> None:
        if self.aio is not None:
            self.aio.close()     # waits for requests still in flight
            self.aio = None
        self.pool.shutdown(wait=True)
        self.backend.close()
