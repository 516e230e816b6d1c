"""virtio-rnd (virtio entropy device, virtio spec 5.4): the host's getrandom() for the guest.

One queue; every device-writable buffer the driver posts is filled from ``os.getrandom``. An
optional byte-rate limit (a token bucket refilled ``rate`` bytes per second) keeps a guest from
draining the host's entropy at will; when the bucket is empty the request waits, and a timer
serves it when enough tokens have accumulated.
"""

from __future__ import annotations

import os
import threading
import time

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
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        self.bytes_served = 0

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
        q = self.queues[index]
        with self.lock:
            served = False
            while True:
                chain = q.pop()
                if chain is None:
                    break
                want = min(chain.writable_len, MAX_REQUEST)
                n = self._take(want)
                if want and n == 0:
                    q.undo_pop()
                    self._retry_later(index)
                    break
                left = n
                for addr, length in chain.writable:
                    if left == 0:
                        break
                    k = min(length, left)
                    self.mem.write(addr, os.getrandom(k))
                    left -= k
                self.bytes_served += n
                self.transport.complete(index, chain.head, n, notify=False)
                served = True
        if served:
            self.transport.notify_queue(index)

    def _retry_later(self, index: int) -> None:
        if self.timer is not None and self.timer.is_alive():
            return
        self.timer = threading.Timer(max(0.01, 1.0 / self.rate), self.transport.kick, (index,))
        self.timer.daemon = True
        self.timer.start()

    def reset(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    close = reset
