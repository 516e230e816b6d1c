"""virtio-blk (virtio spec 5.2): a block device over any :class:`vmrun.api.BlockBackend`.

Requests are taken off the queue on the devices' event loop and handed to the platform's
:class:`vmrun.api.BlockQueue`, which does the I/O (native AIO for an O_DIRECT image, worker
threads otherwise, zero-copy both ways) and hands each completion back on the loop. Every
request is checked before anything is read: a header of 16 readable bytes, a 1-byte writable
status at the end, data lengths that are whole sectors, sectors inside the disk, a discard
payload of whole 16-byte segments and at most ``MAX_DISCARD_SEG`` of them (checked from the
chain's lengths, so a huge payload is never copied). A malformed request gets
VIRTIO_BLK_S_IOERR (or UNSUPP); a malformed chain raises a GuestError and the transport marks
the device DEVICE_NEEDS_RESET — requests already submitted still complete.
"""

from __future__ import annotations

import errno
import logging
import struct

from vmrun.api import (
    BlockQueue,
    DescriptorChain,
    GuestError,
    VirtioDevice,
)

log = logging.getLogger("vmrun.virtio-blk")

VIRTIO_ID_BLOCK = 2
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
_HEADER = struct.Struct("<IIQ")
_DISCARD_SEG = struct.Struct("<QII")


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
        self.queue_size = queue_size
        self.workers = workers
        self.read_only = backend.read_only
        self.sectors = backend.size // SECTOR
        self.features = (VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_BLK_SIZE
                         | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY)
        if self.read_only:
            self.features |= VIRTIO_BLK_F_RO
        elif backend.supports_discard:
            self.features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        self.requests = 0
        self.io: BlockQueue | None = None

    def setup(self) -> None:
        self.io = BlockQueue(self.backend, self.loop, depth=self.queue_size,
                             workers=self.workers, owner=self, name=self.name)

    @property
    def aio_requests(self) -> int:
        return self.io.aio_submitted if self.io is not None else 0

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
        io = self.io
        assert io is not None
        try:
            while True:
                chain = q.pop()
                if chain is None:
                    break
                self.requests += 1
                self._start(index, chain)
        finally:
            io.submit()      # what was taken before a bad chain still goes out

    def _start(self, index: int, chain: DescriptorChain) -> None:
        """Check one request and hand it to the block queue (or answer it at once)."""
        readable, writable = chain.readable, chain.writable
        if not writable or chain.readable_len < _HEADER.size:
            raise GuestError(f"request at head {chain.head}: no 16-byte header or no "
                             "writable status byte")
        dma = self.dma
        addr, length = writable[-1]
        status = dma.view(addr + length - 1, 1)          # checked, like every access
        data_in = writable[:-1] + [(addr, length - 1)] if length > 1 else writable[:-1]
        gpa, n = readable[0]
        if n >= _HEADER.size:                            # the usual case: one header piece
            rtype, _reserved, sector = _HEADER.unpack(dma.view(gpa, _HEADER.size))
            rest = readable[1:] if n == _HEADER.size else \
                [(gpa + _HEADER.size, n - _HEADER.size), *readable[1:]]
        else:
            reader = dma.sg(readable).reader()
            rtype, _reserved, sector = reader.read_struct(_HEADER)
            rest = reader.take().pieces
        done = self._completion(index, chain, status,
                                rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID))
        try:
            self._dispatch(rtype, sector, rest, data_in, done)
        except RequestError as e:
            log.debug("request at head %d: %s", chain.head, e)
            done(-errno.EIO if e.status == VIRTIO_BLK_S_IOERR else -errno.EOPNOTSUPP)

    def _completion(self, index: int, chain: DescriptorChain, status: memoryview,
                    writes_data: bool):
        """The request's one completion: status byte, used ring. Bytes written into the
        chain are ``result`` for a read or GET_ID (what was read), none otherwise."""
        complete = self.transport.complete

        def done(result: int) -> None:
            if result >= 0:
                status[0] = VIRTIO_BLK_S_OK
                complete(index, chain, (result if writes_data else 0) + 1)
                return
            status[0] = VIRTIO_BLK_S_UNSUPP if result == -errno.EOPNOTSUPP else \
                VIRTIO_BLK_S_IOERR
            complete(index, chain, 1)
        return done

    def _dispatch(self, rtype: int, sector: int, rest: list[tuple[int, int]],
                  data_in: list[tuple[int, int]], done) -> None:
        """``rest``: the readable pieces after the header; ``data_in``: the writable pieces
        before the status byte."""
        io = self.io
        assert io is not None
        if rtype == VIRTIO_BLK_T_IN:
            data = self.dma.sg(data_in)
            self._check_range(sector, data.nbytes)
            io.read(sector * SECTOR, data, done)
        elif rtype == VIRTIO_BLK_T_OUT:
            if self.read_only:
                raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            data = self.dma.sg(rest)
            self._check_range(sector, data.nbytes)
            io.write(sector * SECTOR, data, done)
        elif rtype == VIRTIO_BLK_T_FLUSH:
            io.flush(done)
        elif rtype == VIRTIO_BLK_T_GET_ID:
            w = self.dma.sg(data_in).writer()
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:w.remaining]
            w.write(ident)
            done(len(ident))
        elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            if self.read_only:
                raise RequestError(VIRTIO_BLK_S_IOERR, "discard on a read-only disk")
            if not self.backend.supports_discard:
                raise RequestError(VIRTIO_BLK_S_UNSUPP, "discard not supported")
            size = sum(n for _, n in rest)           # checked before a byte is copied
            if size == 0 or size % _DISCARD_SEG.size or \
                    size // _DISCARD_SEG.size > MAX_DISCARD_SEG:
                raise RequestError(VIRTIO_BLK_S_IOERR, f"discard payload of {size} bytes")
            reader = self.dma.sg(rest).reader()
            segs = [reader.read_struct(_DISCARD_SEG) for _ in range(size // _DISCARD_SEG.size)]
            for start, count, _flags in segs:
                self._check_range(start, count * SECTOR)
            self._discard_all(rtype, segs, done)
        else:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"request type {rtype}")

    def _discard_all(self, rtype: int, segs, done) -> None:
        """One completion for all segments: the first error wins."""
        io = self.io
        assert io is not None
        left = [len(segs)]
        worst = [0]

        def one(result: int) -> None:
            if result < 0 and not worst[0]:
                worst[0] = result
            left[0] -= 1
            if left[0] == 0:
                done(worst[0])

        for start, count, flags in segs:
            if rtype == VIRTIO_BLK_T_DISCARD:
                io.discard(start * SECTOR, count * SECTOR, one)
            else:
                io.write_zeroes(start * SECTOR, count * SECTOR, bool(flags & 1), one)

    def _check_range(self, sector: int, nbytes: int) -> None:
        if nbytes % SECTOR:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"{nbytes} bytes is not whole sectors")
        if sector + nbytes // SECTOR > self.sectors:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"sectors {sector}+{nbytes // SECTOR} beyond "
                               f"the end of the disk ({self.sectors})")

    # -- snapshots -------------------------------------------------------------------------
    def save_state(self) -> dict:
        """Nothing of its own: every request in flight finishes (its completion lands in the
        used ring, in guest RAM) and the image is flushed. The image is not copied: a
        restore needs the same file, unchanged since."""
        if self.io is not None and not self.io.drain(30):
            from vmrun.api import VmrunError

            raise VmrunError(f"{self.name}: requests still in flight after 30 s")
        if not self.read_only:
            self.backend.flush()
        return {}

    def load_state(self, state: dict) -> None:
        pass

    # -- reset and close -------------------------------------------------------------------
    def reset(self) -> None:
        """Drain: no host I/O may touch guest memory once the driver has reset us."""
        if self.io is not None:
            self.io.drain()

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
            self.io = None
        self.backend.close()

