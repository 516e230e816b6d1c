"""NIC test helpers: an in-memory backend (alone or as a wired pair) and a virtio-net driver.

:class:`LoopbackBackend` implements :class:`vmrun.net.backend.NetBackend` without any host
I/O: a test ``inject``\\ s frames for the NIC to receive (delivered on the event loop, only
while the NIC has switched receive on, as a real backend), reads what the NIC sent from
``sent`` (or ``wait_sent``), can make ``send`` report a full host side (``set_full``), and
takes the link down and up (``set_link``). :func:`loopback_pair` wires two of them back to
back, so two NICs (or a NIC and a test) share a link. Any NIC model can use them::

    from vmrun.testing.nic import LoopbackBackend
    be = LoopbackBackend(vm.loop)
    nic = MyNic(be, mac=b"\\x02\\0\\0\\0\\0\\1")
    be.inject(frame); ...; assert be.wait_sent(1)

:class:`VirtioNetDriver` drives a virtio-net function on a :class:`~vmrun.testing.FakeVm` as
Linux's driver does: features, receive buffers (mergeable or not), transmit with a header,
the control queue.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from collections.abc import Sequence

from vmrun.core.eventloop import EventLoop
from vmrun.net.backend import LinkCallbacks, NetBackend


class LoopbackBackend(NetBackend):
    """A backend whose other end is the test (or a peer LoopbackBackend)."""

    def __init__(self, loop: EventLoop, caps: frozenset[str] = frozenset(),
                 mtu: int = 1500) -> None:
        super().__init__(kind="loopback", caps=frozenset(caps), mtu=mtu, link_up=True)
        self.loop = loop
        self.cb: LinkCallbacks | None = None
        self.rx_on = False
        self.rx_toggles = 0            # how often the NIC switched receive on or off
        self.full = False
        self.peer: LoopbackBackend | None = None
        self.offloads: frozenset[str] = frozenset()
        self.sent: list[bytes] = []
        self._queue: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._scheduled = False
        self.closed = False

    # -- the test's side ----------------------------------------------------------------
    def inject(self, frame: bytes) -> None:
        """Queue one frame (with its vnet header where the caps say so) for the NIC."""
        self._queue.append(bytes(frame))
        self._kick()

    def pending(self) -> int:
        """Frames injected and not yet taken by the NIC."""
        return len(self._queue)

    def set_full(self, full: bool) -> None:
        self.full = full
        if not full:
            self.loop.call_soon(self._writable)

    def set_link(self, up: bool) -> None:
        self.link_up = up
        self.loop.call_soon(self._link, up)

    def wait_sent(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` frames were sent by the NIC."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.sent) < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_taken(self, timeout: float = 5.0) -> bool:
        """Wait until the NIC has taken every injected frame."""
        end = time.monotonic() + timeout
        while self._queue and time.monotonic() < end:
            time.sleep(0.002)
        return not self._queue

    # -- the NIC's side (the contract) --------------------------------------------------
    def attach(self, callbacks: LinkCallbacks) -> None:
        self.cb = callbacks
        self.rx_on = False

    def detach(self) -> None:
        self.cb = None
        self.rx_on = False

    def set_rx(self, on: bool) -> None:
        if on != self.rx_on:
            self.rx_on = on
            self.rx_toggles += 1
            if on:
                self._kick()

    def set_offloads(self, caps: frozenset[str]) -> None:
        self.offloads = frozenset(caps)

    def recv_into(self, buf: memoryview) -> int:
        while self._queue:
            frame = self._queue.popleft()
            if len(frame) > len(buf):
                self.rx_dropped += 1
                continue
            buf[:len(frame)] = frame
            return len(frame)
        return 0

    def send(self, frame: Sequence[memoryview | bytes]) -> bool:
        if self.full:
            return False
        data = b"".join(bytes(p) for p in frame)
        if not self.link_up:
            self.tx_dropped += 1
            return True
        with self._cond:
            self.sent.append(data)
            self._cond.notify_all()
        if self.peer is not None:
            self.peer.inject(data)
        return True

    def close(self) -> None:
        self.closed = True
        self.cb = None

    # -- the loop side ------------------------------------------------------------------
    def _kick(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        cb = self.cb
        if self.rx_on and cb is not None and self._queue:
            cb.readable()

    def _writable(self) -> None:
        cb = self.cb
        if cb is not None:
            cb.writable()

    def _link(self, up: bool) -> None:
        cb = self.cb
        if cb is not None:
            cb.link(up)


def loopback_pair(loop: EventLoop, caps: frozenset[str] = frozenset(),
                  mtu: int = 1500) -> tuple[LoopbackBackend, LoopbackBackend]:
    """Two backends wired back to back: what one NIC sends, the other receives."""
    a, b = LoopbackBackend(loop, caps, mtu), LoopbackBackend(loop, caps, mtu)
    a.peer, b.peer = b, a
    return a, b


def ethernet(dst: bytes, src: bytes, ethertype: int = 0x0800, payload: bytes = b"") -> bytes:
    """An Ethernet frame (no FCS)."""
    return dst + src + struct.pack(">H", ethertype) + payload


# -- a virtio-net driver on fake memory ------------------------------------------------------
VNET_HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start/offset,
#                                        num_buffers


class VirtioNetDriver:
    """Linux's virtio-net driver in miniature, on a :class:`~vmrun.testing.FakeVm`.

    Receive buffers sit at fixed places (descriptor ``i`` -> buffer ``i``), so they can be
    posted again and again; transmit chains come from a wrapping allocator. ``recv()`` gathers
    merged buffers (``num_buffers``) back into one frame.
    """

    def __init__(self, vm, slot: int, rx_buf: int = 1526) -> None:
        from vmrun.testing.virtio import VirtioDriver

        self.vm = vm
        self.mem = vm.memory
        self.drv = VirtioDriver(vm, slot)
        self.rx_buf = rx_buf
        self.features = 0

    def setup(self, features: int | None = None, queue_sizes: list[int] | None = None) -> int:
        from vmrun.testing.virtio import Allocator

        drv = self.drv
        drv.alloc = Allocator(0x100000, self.mem.size)
        self.features = drv.setup(features, queue_sizes)
        self.rxq, self.txq, self.ctrlq = drv.queues
        self.rx_base = drv.alloc.alloc(self.rxq.size * self.rx_buf, 4096)
        self.rx_next = 0
        self.rx_posted = 0
        self.tx_base = drv.alloc.alloc(0, 4096)
        self.tx_start = self.tx_base
        self.tx_end = self.mem.size
        self.tx_next = self.tx_base
        return self.features

    def config(self, offset: int, size: int) -> int:
        return self.drv.device_config(offset, size)

    def mac(self) -> bytes:
        return bytes(self.config(i, 1) for i in range(6))

    # -- receive ------------------------------------------------------------------------
    def post_rx(self, count: int | None = None, kick: bool = True) -> int:
        """Post receive buffers (all free ones by default); returns how many."""
        from vmrun.core.virtio.queue import VIRTQ_DESC_F_WRITE

        q = self.rxq
        free = q.size - self.rx_posted
        n = free if count is None else min(count, free)
        for _ in range(n):
            i = self.rx_next
            q.write_desc(i, self.rx_base + i * self.rx_buf, self.rx_buf, VIRTQ_DESC_F_WRITE, 0)
            q.publish(i)
            self.rx_next = (i + 1) % q.size
        self.rx_posted += n
        if kick and n:
            self.drv.kick(0)
        return n

    def recv(self) -> list[tuple[tuple, bytes]]:
        """Frames received since the last call: (header fields, frame)."""
        out = []
        used = self.rxq.get_used()
        i = 0
        while i < len(used):
            head, written = used[i]
            data = self.mem.read(self.rx_base + head * self.rx_buf, written)
            hdr = VNET_HDR.unpack(data[:12])
            nbufs = hdr[6] if hdr[6] else 1
            parts = [data[12:]]
            for j in range(1, nbufs):
                if i + j >= len(used):
                    raise AssertionError("merged frame split over recv() calls")
                h2, w2 = used[i + j]
                parts.append(self.mem.read(self.rx_base + h2 * self.rx_buf, w2))
            i += nbufs
            self.rx_posted -= nbufs
            out.append((hdr, b"".join(parts)))
        return out

    def wait_recv(self, n: int, timeout: float = 5.0) -> list[tuple[tuple, bytes]]:
        got: list[tuple[tuple, bytes]] = []
        end = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < end:
            got += self.recv()
            if len(got) < n:
                time.sleep(0.002)
        return got

    # -- transmit -----------------------------------------------------------------------
    def _alloc(self, n: int) -> int:
        addr = (self.tx_next + 15) & ~15
        if addr + n > self.tx_end:
            addr = self.tx_start
        self.tx_next = addr + n
        return addr

    def send(self, frame: bytes, hdr: bytes | None = None, split: bool = False,
             kick: bool = True) -> int:
        """Queue one frame (header + frame in one buffer, or two with ``split``); returns
        the head."""
        from vmrun.core.virtio.queue import VIRTQ_DESC_F_NEXT

        q = self.txq
        hdr = bytes(12) if hdr is None else hdr
        bufs = [hdr, frame] if split else [hdr + frame]
        head = q.free
        idxs = [(q.free + k) % q.size for k in range(len(bufs))]
        for k, data in enumerate(bufs):
            a = self._alloc(max(len(data), 1))
            self.mem.write(a, data)
            last = k == len(bufs) - 1
            q.write_desc(idxs[k], a, len(data), 0 if last else VIRTQ_DESC_F_NEXT,
                         0 if last else idxs[k + 1])
        q.free = (q.free + len(bufs)) % q.size
        q.publish(head)
        if kick:
            self.drv.kick(1)
        return head

    def wait_tx_used(self, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        end = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < end:
            got += self.txq.get_used()
            if len(got) < n:
                time.sleep(0.002)
        return got

    # -- control ------------------------------------------------------------------------
    def ctrl(self, cls: int, cmd: int, data: bytes = b"", timeout: float = 5.0) -> int:
        """One control command; the ack byte (0 OK, 1 ERR)."""
        q = self.ctrlq
        head, (ack,) = q.add([bytes([cls, cmd]), data] if data else [bytes([cls, cmd])], [1])
        self.drv.kick(2)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for h, _n in q.get_used():
                if h == head:
                    return self.mem.read(ack, 1)[0]
            time.sleep(0.002)
        raise AssertionError("control command not answered")
