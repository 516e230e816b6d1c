"""The virtio device contract: what a device (blk, rng, net, ...) implements.

A device knows its type, its queues, its feature bits and its configuration layout; it never
knows PCI. The transport (:mod:`vmrun.core.virtio.pci`) negotiates features, runs the status
machine, and calls :meth:`VirtioDevice.activate` when the driver sets DRIVER_OK, then
:meth:`queue_notify` on the event loop (with the transport's lock held) whenever the driver
kicks a queue. Once placed, :meth:`realized` gives the device ``self.loop`` (the devices'
event loop, for its own fds and timers) and ``self.dma`` (guest memory, gated by bus
mastering). A device reads and writes a chain only through :meth:`reader`/:meth:`writer`
(bounds-checked :class:`~vmrun.core.dma.SgList` views). To hand a chain back it calls
``self.transport.complete(queue, chain, written)``. Whatever it raises while serving a queue
(a :class:`~vmrun.core.memory.GuestError` for guest input, or anything else) marks the device
DEVICE_NEEDS_RESET; it never needs to catch guest errors itself to protect the VMM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmrun.core.dma import GuestDma, SgReader, SgWriter
    from vmrun.core.eventloop import EventLoop
    from vmrun.core.memory import GuestMemory
    from vmrun.core.virtio.pci import VirtioPciTransport
    from vmrun.core.virtio.queue import DescriptorChain, Virtqueue

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
    loop: EventLoop | None = None
    dma: GuestDma
    mem: GuestMemory
    queues: list[Virtqueue]

    def realized(self, transport: VirtioPciTransport) -> None:
        """Placed on the bus: take the loop and DMA window; add fds and timers here."""
        self.transport = transport
        self.loop = transport.loop
        self.dma = transport.dma
        self.setup()

    def setup(self) -> None:
        """Hook for subclasses: called once from :meth:`realized`."""

    def reader(self, chain: DescriptorChain) -> SgReader:
        """The chain's device-readable buffers, checked, as a reader."""
        return self.dma.sg(chain.readable).reader()

    def writer(self, chain: DescriptorChain) -> SgWriter:
        """The chain's device-writable buffers, checked, as a writer."""
        return self.dma.sg(chain.writable).writer()

    def fault(self, reason: str) -> None:
        """An event-loop callback of this device raised: the transport marks it broken."""
        self.transport.fault(reason)

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
        """The driver made buffers available in queue ``index`` (on the event loop)."""

    def reset(self) -> None:
        """The driver wrote 0 to device_status: stop, wait for what is in flight (host I/O
        into guest memory), forget negotiated state. Called on a vCPU thread, never under
        the transport's lock."""

    def close(self) -> None:
        """Release host resources."""

    # -- snapshots (vmrun.core.devstate) ----------------------------------------------
    def save_state(self) -> dict:
        """The device's own state (the transport saves the queues): plain data, taken with
        the vCPUs paused and the event loop held. A device must first finish what it has in
        flight (a disk: drain and flush), so that the used rings in the saved RAM say
        everything it did, or save what it holds (a NIC: the chains it popped, by head;
        :meth:`Virtqueue.chain_at` walks them again after the restore). The default: this
        device cannot, and the snapshot is refused naming it."""
        from vmrun.core.devstate import SnapshotUnsupported

        raise SnapshotUnsupported(f"{self.name}: this device cannot be snapshotted yet")

    def load_state(self, state: dict) -> None:
        """Before the queues are activated again (in a restored machine, not started)."""
        from vmrun.core.devstate import SnapshotUnsupported

        if state:
            raise SnapshotUnsupported(f"{self.name}: this device cannot be restored")
