"""The virtio 1.x modern PCI transport (virtio spec 4.1) for any :class:`VirtioDevice`.

BAR 0 (32-bit memory, 16 KiB) holds the common configuration (0x0000), the ISR (0x1000), the
device configuration (0x2000) and the notification area (0x3000, one 4-byte slot per queue);
the core puts the MSI-X table and PBA in BAR 2 (``msix_bar``) and owns them. Queue
notifications are doorbells (ioeventfds) served on the devices' event loop, so the vCPU that
kicked a queue goes straight back into the guest; interrupts leave through the function's
:class:`~vmrun.core.interrupts.InterruptSource` (MSI-X irqfds, or INTx with the ISR).

Against a hostile driver:

- one lock (``self.lock``) covers the status machine, queue set-up and every use of the
  rings: queue service on the loop, completions, a reset from a vCPU. A reset first stops
  the device (under the lock, so no service is half-way), then drains what the device has in
  flight *outside* the lock (completions may need it), then clears the queues; completions of
  requests from before a reset carry an older epoch and are dropped;
- status bits only accumulate until a reset: a write that clears DRIVER_OK or FEATURES_OK is
  ignored, as are queue set-up writes once the queue is enabled or the device is live;
- anything a device raises from guest input (:class:`~vmrun.core.memory.GuestError`, or any
  other exception) marks *this* device DEVICE_NEEDS_RESET with a config interrupt, one log
  line; a driver reset recovers it. Nothing reaches the vCPU or the event loop;
- with bus mastering off the device neither serves queues nor completes into them.
"""

from __future__ import annotations

import logging
import struct
import threading
from functools import partial

from vmrun.core.interrupts import MODE_INTX, NO_VECTOR
from vmrun.core.memory import GuestMemory
from vmrun.core.pci import BAR_MEM32, CAP_ID_VENDOR, COMMAND_MASTER, BarSpec, PciDevice
from vmrun.core.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from vmrun.core.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError

log = logging.getLogger("vmrun.virtio")

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x1000
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE = 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4
BAR_SIZE = 0x4000
MSIX_BAR = 2
ISR_QUEUE = 1
ISR_CONFIG = 2
_RING_FIELDS = ((0x20, "desc_addr"), (0x28, "avail_addr"), (0x30, "used_addr"))


class VirtioPciTransport(PciDevice):
    """A PCI function that carries one virtio device."""

    interrupt_pin = 1
    subsystem_vendor_id = VIRTIO_PCI_VENDOR
    vendor_id = VIRTIO_PCI_VENDOR
    revision = 1
    msix_bar = MSIX_BAR

    def __init__(self, device: VirtioDevice, mem: GuestMemory | None = None) -> None:
        self.device = device
        device.transport = self
        self.name = device.name
        self.device_id = 0x1040 + device.device_type
        self.subsystem_id = device.device_type
        self.class_code = device.pci_class
        self.queues = [Virtqueue(i, n) for i, n in enumerate(device.queue_sizes)]
        if not 1 <= len(self.queues) <= NOTIFY_SIZE // NOTIFY_MULTIPLIER:
            raise ValueError(f"{device.name}: {len(self.queues)} queues")
        self.msix_vectors = len(self.queues) + 1
        self.bars = [BarSpec(0, BAR_SIZE, BAR_MEM32)]
        self.device_features = device.features | VIRTIO_F_VERSION_1 | \
            VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX
        self.test_mem = mem
        self.lock = threading.RLock()
        self.epoch = 0
        self.faults = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.config_generation = 0
        self.isr = 0
        self.active = False
        for q in self.queues:
            q.reset()

    @property
    def msix(self):
        """The MSI-X vectors (owned by the core's interrupt source)."""
        return self.irq.msix if self.irq is not None else None

    # -- PCI wiring --------------------------------------------------------------------
    def realize(self) -> None:
        cfg = self.config
        for cfg_type, off, length, extra in (
                (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, 0x38, b""),
                (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, b""),
                (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE, b""),
                (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * len(self.queues),
                 struct.pack("<I", NOTIFY_MULTIPLIER))):
            body = struct.pack("<BBBBHII", 16 + len(extra), cfg_type, 0, 0, 0, off,
                               length) + extra
            cfg.add_capability(CAP_ID_VENDOR, body)
        for i in range(len(self.queues)):
            self.add_doorbell(0, NOTIFY_OFFSET + NOTIFY_MULTIPLIER * i, 2, partial(self.kick, i))
        self.device.realized(self)

    def close(self) -> None:
        # Stop first: completions of requests still in flight (delivered on the loop after
        # the interrupt source's eventfds are closed, maybe reused) are dropped.
        with self.lock:
            self.active = False
            self.epoch += 1
        self.device.close()

    # -- BAR accesses (vCPU threads; nothing a guest writes may raise out of here) ---------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        try:
            if offset < COMMON_OFFSET + COMMON_SIZE:
                return self._common_read(offset, size)
            if offset < ISR_OFFSET + ISR_SIZE:
                with self.lock:
                    value, self.isr = self.isr, 0
                    if self.irq is not None:
                        self.irq.deassert()
                    else:
                        self.set_intx(False)
                return value
            if offset < DEVICE_OFFSET + DEVICE_SIZE:
                data = self.device.config_bytes()
                off = offset - DEVICE_OFFSET
                chunk = data[off:off + size]
                return int.from_bytes(chunk.ljust(size, b"\0"), "little")
        except Exception as e:
            self.fault(f"register read at {offset:#x}: {type(e).__name__}: {e}")
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        try:
            if offset < COMMON_OFFSET + COMMON_SIZE:
                self._common_write(offset, size, value)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
                with self.lock:
                    self.device.config_write(offset - DEVICE_OFFSET,
                                             value.to_bytes(size, "little"))
            elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_SIZE:
                # Only reached when no ioeventfd caught it (tests, odd access sizes): the
                # device still does its work on the loop, never on the vCPU.
                q = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
                if q < len(self.queues):
                    if self.loop is not None:
                        self.loop.call_soon(self.kick, q, owner=self)
                    else:
                        self.kick(q)
        except Exception as e:
            self.fault(f"register write at {offset:#x}: {type(e).__name__}: {e}")

    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_read(self, offset: int, size: int) -> int:
        q = self._queue()
        if offset == 0x00:
            return self.device_feature_select
        if offset == 0x04:
            sel = self.device_feature_select
            return (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if offset == 0x08:
            return self.driver_feature_select
        if offset == 0x0C:
            sel = self.driver_feature_select
            return (self.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if offset == 0x10:
            return self.config_msix_vector
        if offset == 0x12:
            return len(self.queues)
        if offset == 0x14:
            return self.status if size == 1 else self.status | (self.config_generation << 8)
        if offset == 0x15:
            return self.config_generation
        if offset == 0x16:
            return self.queue_select
        if q is None:
            return 0
        if offset == 0x18:
            return q.size
        if offset == 0x1A:
            return q.msix_vector
        if offset == 0x1C:
            return int(q.ready)
        if offset == 0x1E:
            return q.index
        for base, attr in _RING_FIELDS:
            if base <= offset < base + 8:
                v = getattr(q, attr)
                return (v >> (8 * (offset - base))) & ((1 << (8 * size)) - 1)
        return 0

    def _vector(self, value: int) -> int:
        return value if value < self.msix_vectors else NO_VECTOR

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x14 and value & 0xFF == 0:
            self.reset_device()
            return
        with self.lock:
            q = self._queue()
            if offset == 0x00:
                self.device_feature_select = value
            elif offset == 0x08:
                self.driver_feature_select = value
            elif offset == 0x0C:
                sel = self.driver_feature_select
                if sel < 2 and not self.status & STATUS_FEATURES_OK:
                    mask = 0xFFFFFFFF << (32 * sel)
                    self.driver_features = (self.driver_features & ~mask) | \
                        ((value & 0xFFFFFFFF) << (32 * sel))
            elif offset == 0x10:
                self.config_msix_vector = self._vector(value)
            elif offset == 0x14:
                self._set_status(value & 0xFF)
            elif offset == 0x16:
                self.queue_select = value
            elif q is None or q.ready or self.status & STATUS_DRIVER_OK:
                return          # queue set-up is frozen once the queue or device is live
            elif offset == 0x18:
                if value and not value & (value - 1) and value <= q.max_size:
                    q.size = value
            elif offset == 0x1A:
                q.msix_vector = self._vector(value)
            elif offset == 0x1C:
                q.ready = value == 1
            else:
                for base, attr in _RING_FIELDS:
                    if base <= offset < base + 8:
                        shift = 8 * (offset - base)
                        mask = ((1 << (8 * size)) - 1) << shift
                        cur = getattr(q, attr)
                        setattr(q, attr, (cur & ~mask) | ((value << shift) & mask))

    # -- status machine ------------------------------------------------------------------
    def reset_device(self) -> None:
        """The driver wrote 0 to device_status (or the machine reset). Stop under the lock,
        drain outside it, then forget everything, in a new epoch."""
        with self.lock:
            self.active = False
            self.epoch += 1
        try:
            self.device.reset()
        except Exception as e:
            log.error("%s: reset: %s", self.name, e)
        with self.lock:
            self._reset_state()
            if self.irq is not None:
                if self.irq.msix is not None:
                    self.irq.msix.reset()
                self.irq.deassert()

    def reset(self) -> None:
        self.reset_device()

    def _set_status(self, value: int) -> None:
        old = self.status
        if old & ~value & (STATUS_DRIVER_OK | STATUS_FEATURES_OK | 0x3):
            log.debug("%s: driver cleared status bits %#x without a reset: ignored", self.name,
                      old & ~value)
            return
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            unknown = self.driver_features & ~self.device_features
            if unknown or not self.driver_features & VIRTIO_F_VERSION_1:
                value &= ~STATUS_FEATURES_OK    # the driver reads it back and gives up
        self.status = value | (old & STATUS_DEVICE_NEEDS_RESET)
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            self._activate()

    def _memory(self) -> GuestMemory:
        if self.vm is not None and self.vm.memory is not None:
            return self.vm.memory
        assert self.test_mem is not None
        return self.test_mem

    def _activate(self) -> None:
        mem = self._memory()
        event_idx = bool(self.driver_features & VIRTIO_F_RING_EVENT_IDX)
        try:
            for q in self.queues:
                if q.ready:
                    q.activate(mem, event_idx, self.epoch)
        except VirtqueueError as e:
            self._broken(str(e))
            return
        self.active = True
        try:
            self.device.activate(mem, self.queues, self.driver_features)
        except Exception as e:
            self._broken(f"activate: {type(e).__name__}: {e}")

    # -- snapshots ---------------------------------------------------------------------
    _STATE = ("status", "device_feature_select", "driver_feature_select", "driver_features",
              "config_msix_vector", "queue_select", "config_generation", "isr", "active")
    _QUEUE_STATE = ("size", "ready", "desc_addr", "avail_addr", "used_addr", "msix_vector",
                    "last_avail", "next_used", "signalled_used")

    def device_state(self) -> dict:
        """The common configuration, every queue's registers and ring positions, and the
        device's own (which first finishes what it has in flight)."""
        dev = self.device.save_state()
        if self.loop is not None:
            self.loop.sync()        # completions the device handed to the loop are in RAM
        with self.lock:
            return {"transport": {k: getattr(self, k) for k in self._STATE},
                    "queues": [{k: getattr(q, k) for k in self._QUEUE_STATE}
                               for q in self.queues],
                    "device": dev}

    def load_device_state(self, state: dict) -> None:
        """Registers back; a driver that was running gets its queues activated at the saved
        ring positions, and every ready queue is served once (what the driver posted while
        the snapshot was taken)."""
        if len(state["queues"]) != len(self.queues):
            raise ValueError(f"{self.name}: {len(state['queues'])} queues saved, "
                             f"{len(self.queues)} here")
        self.device.load_state(state["device"])
        with self.lock:
            for k in self._STATE:
                setattr(self, k, state["transport"][k])
            for q, qs in zip(self.queues, state["queues"], strict=True):
                for k in self._QUEUE_STATE:
                    setattr(q, k, qs[k])
            if not self.active:
                return
            mem = self._memory()
            event_idx = bool(self.driver_features & VIRTIO_F_RING_EVENT_IDX)
            for q, qs in zip(self.queues, state["queues"], strict=True):
                if q.ready:
                    q.activate(mem, event_idx, self.epoch)
                    q.last_avail, q.next_used = qs["last_avail"], qs["next_used"]
                    q.signalled_used = qs["signalled_used"]
            self.device.activate(mem, self.queues, self.driver_features)
        if self.loop is not None:
            for i, q in enumerate(self.queues):
                if q.ready:
                    self.loop.call_soon(self.kick, i, owner=self)

    def fault(self, reason: str) -> None:
        """The guest (or a bug) broke this device: DEVICE_NEEDS_RESET, config interrupt."""
        with self.lock:
            self._broken(reason)

    broken = fault

    def _broken(self, reason: str) -> None:
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        self.status |= STATUS_DEVICE_NEEDS_RESET
        self.faults += 1
        log.warning("%s: %s: device needs reset", self.name, reason)
        self._interrupt(self.config_msix_vector, ISR_CONFIG)

    # -- the device side -------------------------------------------------------------------
    def _serving(self, q: Virtqueue) -> bool:
        return self.active and q.ready and not self.status & STATUS_DEVICE_NEEDS_RESET \
            and bool(self.config.data[4] & COMMAND_MASTER)

    def serving(self, index: int) -> bool:
        """Whether queue ``index`` may be served now (live, ready, not broken, bus master):
        for work a device starts itself (a NIC's receive), under ``self.lock``."""
        return self._serving(self.queues[index])

    def kick(self, index: int) -> None:
        """Queue ``index`` was notified: let the device serve it (on the event loop)."""
        with self.lock:
            q = self.queues[index]
            if not self._serving(q):
                return
            try:
                self.device.queue_notify(index)
            except Exception as e:
                self._broken(f"queue {index}: {e}" if isinstance(e, VirtqueueError) else
                             f"queue {index}: {type(e).__name__}: {e}")

    def complete(self, index: int, chain: DescriptorChain, written: int,
                 notify: bool = True) -> None:
        """Hand a chain back to the driver; interrupt it if it asked to be. A chain from
        before the last reset, or one completed while bus mastering is off, is dropped."""
        with self.lock:
            q = self.queues[index]
            if chain.epoch != self.epoch or not self.active or q.mem is None or \
                    not self.config.data[4] & COMMAND_MASTER:
                return
            q.push_used(chain.head, min(written, chain.writable_len))
            if notify and q.needs_interrupt():
                self._interrupt(q.msix_vector, ISR_QUEUE)

    def complete_many(self, index: int, done: list[tuple[DescriptorChain, int]]) -> None:
        """:meth:`complete` for a batch (one lock, one interrupt decision): a NIC hands back
        a whole burst of frames at once."""
        with self.lock:
            q = self.queues[index]
            if not self.active or q.mem is None or not self.config.data[4] & COMMAND_MASTER:
                return
            epoch = self.epoch
            push = q.push_used
            for chain, written in done:
                if chain.epoch == epoch:
                    push(chain.head, min(written, chain.writable_len))
            if q.needs_interrupt():
                self._interrupt(q.msix_vector, ISR_QUEUE)

    def notify_queue(self, index: int) -> None:
        """Interrupt for queue ``index`` if the driver wants one (after batched completes)."""
        with self.lock:
            q = self.queues[index]
            if self.active and q.mem is not None and q.needs_interrupt():
                self._interrupt(q.msix_vector, ISR_QUEUE)

    def device_config_changed(self) -> None:
        """The device's configuration changed (a NIC's link status): a new generation and a
        configuration interrupt, once the driver is live (any thread)."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            if self.active:
                self._interrupt(self.config_msix_vector, ISR_CONFIG)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        irq = self.irq
        if irq is None:
            return
        if irq.mode == MODE_INTX:
            self.isr |= isr_bit
        irq.trigger(vector)
