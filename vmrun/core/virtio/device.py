"""The virtio device contract: what a device (blk, rng, net, ...) implements.

A device knows its type, its queues, its feature bits and its configuration layout; it never
knows PCI. The transport (:mod:`vmrun.core.virtio.pci`) negotiates features, runs the status
machine, and calls :meth:`VirtioDevice.activate` when the driver sets DRIVER_OK, then
:meth:`queue_notify` on the device's own thread whenever the driver kicks a queue. To hand
buffers back the device calls ``self.transport.complete(queue, head, written)``; a broken
request calls ``self.transport.broken(reason)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmrun.core.memory import GuestMemory
    from vmrun.core.virtio.pci import VirtioPciTransport
    from vmrun.core.virtio.queue import Virtqueue

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80


class VirtioDevice:
    """Base class of a virtio device. Subclasses set the class attributes and override the
    hooks they need."""

    device_type = 0
    pci_class = 0xFF0000
    queue_sizes: list[int] = [256]
    features = 0          # device-specific feature bits (the transport adds the ring/version)
    name = "virtio"

    transport: VirtioPciTransport
    mem: GuestMemory
    queues: list[Virtqueue]

    def config_bytes(self) -> bytes:
        """The device-specific configuration structure, as the driver reads it."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to device configuration (most devices have nothing writable)."""

    def activate(self, mem: GuestMemory, queues: list[Virtqueue], acked_features: int) -> None:
        """DRIVER_OK: the queues are set up; start serving them."""
        self.mem = mem
        self.queues = queues
        self.acked_features = acked_features

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available in queue ``index`` (called on the I/O thread)."""

    def io_fds(self) -> list[int]:
        """File descriptors the transport's I/O thread should also watch for this device
        (e.g. an AIO completion eventfd), so completions need no thread of their own."""
        return []

    def io_ready(self, fd: int) -> None:
        """One of :meth:`io_fds` is readable (called on the I/O thread)."""

    def reset(self) -> None:
        """The driver wrote 0 to device_status: stop, forget negotiated state."""

    def close(self) -> None:
        """Release host resources."""
