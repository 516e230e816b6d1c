"""The virtio 1.x modern PCI transport (virtio spec 4.1) for any :class:`VirtioDevice`.

BAR 0 (32-bit memory, 16 KiB) holds the common configuration (0x0000), the ISR (0x1000), the
device configuration (0x2000) and the notification area (0x3000, one 4-byte slot per queue);
BAR 2 holds the MSI-X table and PBA. Queue notifications arrive through ioeventfds registered
on the notify slots and are served on the transport's I/O thread, so the vCPU thread that
kicked the queue goes straight back into the guest. Interrupts leave through MSI-X irqfds (or
INTx with the ISR when the driver did not enable MSI-X).
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading

from vmrun.core.memory import GuestMemory
from vmrun.core.msix import MsixVectors
from vmrun.core.pci import BAR_MEM32, CAP_ID_VENDOR, BarSpec, PciDevice
from vmrun.core.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from vmrun.core.virtio.queue import Virtqueue, VirtqueueError

log = logging.getLogger("vmrun.virtio")

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
NO_VECTOR = 0xFFFF

COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x1000
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE = 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4
BAR_SIZE = 0x4000
MSIX_BAR = 2
ISR_QUEUE = 1
ISR_CONFIG = 2


class VirtioPciTransport(PciDevice):
    """A PCI function that carries one virtio device."""

    interrupt_pin = 1
    subsystem_vendor_id = VIRTIO_PCI_VENDOR
    vendor_id = VIRTIO_PCI_VENDOR
    revision = 1

    def __init__(self, device: VirtioDevice, mem: GuestMemory | None = None) -> None:
        self.device = device
        device.transport = self
        self.name = device.name
        self.device_id = 0x1040 + device.device_type
        self.subsystem_id = device.device_type
        self.class_code = device.pci_class
        self.queues = [Virtqueue(i, n) for i, n in enumerate(device.queue_sizes)]
        nvec = len(self.queues) + 1
        self.msix = MsixVectors(nvec, MSIX_BAR, 0, MSIX_BAR, 0x800)
        self.bars = [BarSpec(0, BAR_SIZE, BAR_MEM32), BarSpec(MSIX_BAR, 0x1000, BAR_MEM32)]
        self.device_features = device.features | VIRTIO_F_VERSION_1 | \
            VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX
        self.test_mem = mem
        self.lock = threading.RLock()
        self._reset_state()
        self.eventfds: list[int] = []
        self._notify_base: int | None = None
        self._io_thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

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

    # -- PCI wiring --------------------------------------------------------------------
    def realize(self) -> None:
        cfg = self.config
        self.msix.vm = self.vm
        self.msix.add_capability(cfg)
        for cfg_type, off, length, extra in (
                (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, 0x38, b""),
                (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, b""),
                (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE, b""),
                (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * len(self.queues),
                 struct.pack("<I", NOTIFY_MULTIPLIER))):
            body = struct.pack("<BBBBHII", 16 + len(extra), cfg_type, 0, 0, 0, off,
                               length) + extra
            cfg.add_capability(CAP_ID_VENDOR, body)
        if self.vm is not None:
            self.msix.realize()
            self.eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                             for _ in self.queues]
            self._io_thread = threading.Thread(target=self._io_loop, daemon=True,
                                               name=f"virtio-{self.name}")
            self._io_thread.start()
        self._register_notify(None, self.config.bar_address(0) or None)

    def config_changed(self, offset: int, size: int) -> None:
        super().config_changed(offset, size)
        cap = self.msix.cap_offset
        if offset <= cap + 3 and offset + size > cap + 2:
            self.msix.control_changed()

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        if index == 0 and self.eventfds:
            self._register_notify(old, new)

    def _register_notify(self, old: int | None, new: int | None) -> None:
        if self.vm is None or not self.eventfds:
            return
        for i, fd in enumerate(self.eventfds):
            if self._notify_base is not None:
                self.vm.register_ioeventfd(fd, self._notify_base + NOTIFY_OFFSET
                                           + NOTIFY_MULTIPLIER * i, 2, deassign=True)
            if new is not None:
                self.vm.register_ioeventfd(fd, new + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * i, 2)
        self._notify_base = new

    def _io_loop(self) -> None:
        poller = select.poll()
        for fd in self.eventfds:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        index = {fd: i for i, fd in enumerate(self.eventfds)}
        extra = set(self.device.io_fds())
        for fd in extra:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ev in poller.poll():
                if fd == self._stop_r:
                    return
                if fd in extra:
                    self.device.io_ready(fd)
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                self.kick(index[fd])

    def close(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._io_thread is not None:
            self._io_thread.join(2)
        if self.vm is not None and self._notify_base is not None:
            self._register_notify(self._notify_base, None)
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
        self.msix.close()
        self.device.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    # -- BAR accesses -----------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == MSIX_BAR:
            if offset < 0x800:
                return self.msix.table_read(offset, size)
            return self.msix.pba_read(offset - 0x800, size)
        if offset < COMMON_OFFSET + COMMON_SIZE:
            return self._common_read(offset, size)
        if offset < ISR_OFFSET + ISR_SIZE:
            with self.lock:
                value, self.isr = self.isr, 0
                self.set_intx(False)
            return value
        if offset < DEVICE_OFFSET + DEVICE_SIZE:
            data = self.device.config_bytes()
            off = offset - DEVICE_OFFSET
            chunk = data[off:off + size]
            return int.from_bytes(chunk.ljust(size, b"\0"), "little")
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == MSIX_BAR:
            if offset < 0x800:
                self.msix.table_write(offset, size, value)
            return
        if offset < COMMON_OFFSET + COMMON_SIZE:
            self._common_write(offset, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            self.device.config_write(offset - DEVICE_OFFSET, value.to_bytes(size, "little"))
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_SIZE:
            # Only reached when no ioeventfd caught it (tests, odd access sizes).
            q = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
            if q < len(self.queues):
                self.kick(q)

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
        for base, attr in ((0x20, "desc_addr"), (0x28, "avail_addr"), (0x30, "used_addr")):
            if base <= offset < base + 8:
                v = getattr(q, attr)
                return (v >> (8 * (offset - base))) & ((1 << (8 * size)) - 1)
        return 0

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x14 and value & 0xFF == 0:
            self._reset_device()
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
                self.config_msix_vector = value if value < self.msix.n else NO_VECTOR
            elif offset == 0x14:
                self._set_status(value & 0xFF)
            elif offset == 0x16:
                self.queue_select = value
            elif q is None or self.status & STATUS_DRIVER_OK:
                return
            elif offset == 0x18:
                q.size = value
            elif offset == 0x1A:
                q.msix_vector = value if value < self.msix.n else NO_VECTOR
            elif offset == 0x1C:
                q.ready = value == 1
            else:
                for base, attr in ((0x20, "desc_addr"), (0x28, "avail_addr"),
                                   (0x30, "used_addr")):
                    if base <= offset < base + 8:
                        shift = 8 * (offset - base)
                        mask = ((1 << (8 * size)) - 1) << shift
                        cur = getattr(q, attr)
                        setattr(q, attr, (cur & ~mask) | ((value << shift) & mask))

    # -- status machine ------------------------------------------------------------------
    def _reset_device(self) -> None:
        """The driver wrote 0 to device_status. Completions stop counting first, then the
        device drains what it has in flight (outside our lock: a request finishing meanwhile
        may need it), so nothing from before the reset lands in the rings set up after it."""
        with self.lock:
            self.active = False
        self.device.reset()
        with self.lock:
            self._reset_state()
            self.msix.reset()
            self.set_intx(False)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._reset_device()
            return
        old = self.status
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            unknown = self.driver_features & ~self.device_features
            if unknown or not self.driver_features & VIRTIO_F_VERSION_1:
                value &= ~STATUS_FEATURES_OK    # the driver reads it back and gives up
        self.status = value | (old & STATUS_DEVICE_NEEDS_RESET)
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            self._activate()

    def _activate(self) -> None:
        mem = self.vm.memory if self.vm is not None else self.test_mem
        assert mem is not None
        event_idx = bool(self.driver_features & VIRTIO_F_RING_EVENT_IDX)
        try:
            for q in self.queues:
                if q.ready:
                    q.activate(mem, event_idx)
        except VirtqueueError as e:
            self.broken(str(e))
            return
        self.active = True
        self.device.activate(mem, self.queues, self.driver_features)

    def broken(self, reason: str) -> None:
        """The driver misbehaved: DEVICE_NEEDS_RESET, a config interrupt, one log line."""
        with self.lock:
            if self.status & STATUS_DEVICE_NEEDS_RESET:
                return
            self.status |= STATUS_DEVICE_NEEDS_RESET
            self.active = False
        log.warning("%s: %s: device needs reset", self.name, reason)
        self._interrupt(self.config_msix_vector, ISR_CONFIG)

    # -- the device side -------------------------------------------------------------------
    def kick(self, index: int) -> None:
        """Queue ``index`` was notified: let the device serve it (I/O thread, or the caller
        in tests)."""
        if not self.active or not self.queues[index].ready:
            return
        try:
            self.device.queue_notify(index)
        except VirtqueueError as e:
            self.broken(str(e))

    def complete(self, index: int, head: int, written: int, notify: bool = True) -> None:
        """Hand a chain back to the driver; interrupt it if it asked to be."""
        q = self.queues[index]
        with q.lock:
            if not self.active:
                return
            q.push_used(head, written)
            need = notify and q.needs_interrupt()
        if need:
            self._interrupt(q.msix_vector, ISR_QUEUE)

    def notify_queue(self, index: int) -> None:
        """Interrupt for queue ``index`` if the driver wants one (after batched completes)."""
        q = self.queues[index]
        with q.lock:
            need = q.needs_interrupt()
        if need:
            self._interrupt(q.msix_vector, ISR_QUEUE)

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        with self.lock:
            self.isr |= isr_bit
            self.set_intx(True)
