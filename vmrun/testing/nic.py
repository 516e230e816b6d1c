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
        if self.rx_on and self.cb is not None and self._queue:
            self.cb.readable()

    def _writable(self) -> None:
        if self.cb is not None:
            self.cb.writable()

    def _link(self, up: bool) -> None:
        if self.cb is not None:
            self.cb.link(up)


def loopback_pair(loop: EventLoop, caps: frozenset[str] = frozenset(),
                  mtu: int = 1500) -> tuple[LoopbackBackend, LoopbackBackend]:
    """Two backends wired back to back: what one NIC sends, the other receives."""
    a, b = LoopbackBackend(loop, caps, mtu), LoopbackBackend(loop, caps, mtu)
    a.peer, b.peer = b, a
    return a, b


def ethernet(dst: bytes, src: bytes, ethertype: int = 0x0800, payload: bytes = b"") -> bytes:
    """An Ethernet frame (no FCS)."""
    return dst + src + struct.pack(">H", ethertype) + payload
