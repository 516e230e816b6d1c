"""virtio-rnd (virtio entropy device, virtio spec 5.4): the host's getrandom() for the guest.

One queue; every device-writable buffer the driver posts is filled from ``os.getrandom``, at
most ``MAX_REQUEST`` bytes per chain. An optional byte-rate limit (a token bucket refilled
``rate`` bytes per second) keeps a guest from draining the host's entropy at will; when the
bucket is empty the request waits, and a timer on the devices' event loop serves the queue
again when enough tokens have accumulated.
"""

from __future__ import annotations

import os
import time

from vmrun.core.eventloop import Timer
from vmrun.core.virtio.device import VIRTIO_ID_RNG, VirtioDevice

MAX_REQUEST = 64 * 1024   # bytes filled per chain at most (Linux asks for 64 bytes or less)


class VirtioRng(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    pci_class = 0x00FF00
    queue_sizes = [256]
    name = "virtio-rnd"

    def __init__(self, rate: int = 0, clock=time.monotonic) -> None:
        self.rate = rate                  # bytes per second, 0 = unlimited
        self.clock = clock
        self.tokens = float(rate)
        self.last = clock()
        self.timer: Timer | None = None
        self.bytes_served = 0

    def setup(self) -> None:
        if self.rate and self.loop is not None:
            self.timer = self.loop.timer(lambda: self.transport.kick(0), owner=self)

    def _take(self, want: int) -> int:
        if not self.rate:
            return want
        now = self.clock()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        n = min(want, int(self.tokens))
        self.tokens -= n
        return n

    def queue_notify(self, index: int) -> None:
        """On the event loop, under the transport's lock."""
        q = self.queues[index]
        served = False
        try:
            while True:
                chain = q.pop()
                if chain is None:
                    break
                writer = self.writer(chain)         # checked before anything is taken
                want = min(writer.remaining, MAX_REQUEST)
                n = self._take(want)
                if want and n == 0:
                    q.undo_pop()
                    if self.timer is not None:
                        self.timer.arm(max(0.01, 1.0 / self.rate))
                    break
                if n:
                    writer.write(os.getrandom(n))
                self.bytes_served += n
                self.transport.complete(index, chain, n, notify=False)
                served = True
        finally:
            if served:
                self.transport.notify_queue(index)

    def save_state(self) -> dict:
        """Nothing in flight: a request waiting for tokens stays in the avail ring (undone)
        and is served again after a restore; the bucket starts full again."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def reset(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()
            self.timer = None
