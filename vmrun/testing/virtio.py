"""A mock virtio driver: rings laid out in fake guest memory, driven through the PCI transport.

:class:`MockVirtqueue` writes descriptor tables, available and used rings as a driver would
(and can write broken ones on purpose); :class:`VirtioDriver` finds the device's virtio
capabilities, negotiates features, sets up queues and MSI-X, and sets DRIVER_OK.
"""

from __future__ import annotations

import struct

from vmrun.core.memory import GuestMemory
from vmrun.core.pci import CAP_ID_MSIX, CAP_ID_VENDOR
from vmrun.core.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
)
from vmrun.core.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmrun.testing.pcidriver import PciDriver


class Allocator:
    """A bump allocator over a region of fake guest RAM."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError("test allocator exhausted")
        self.next = addr + size
        return addr


class MockVirtqueue:
    def __init__(self, mem: GuestMemory, alloc: Allocator, size: int) -> None:
        self.mem = mem
        self.alloc = alloc
        self.size = size
        self.desc = alloc.alloc(16 * size, 16)
        self.avail = alloc.alloc(6 + 2 * size, 2)
        self.used = alloc.alloc(6 + 8 * size, 4)
        # Fresh rings are zeroed, as Linux's are: a reset driver that reuses the memory must
        # not read the last run's used entries as new ones (a test raced on that).
        for addr, n in ((self.desc, 16 * size), (self.avail, 6 + 2 * size),
                        (self.used, 6 + 8 * size)):
            mem.write(addr, bytes(n))
        self.free = 0
        self.avail_idx = 0
        self.last_used = 0

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def add(self, readable: list[bytes], writable: list[int], indirect: bool = False,
            align: int = 16) -> tuple[int, list[int]]:
        """Post one chain; returns (head, [guest addresses of the writable buffers]).
        Buffers of a sector or more are aligned to ``align`` (O_DIRECT paths care)."""
        bufs = []
        for data in readable:
            a = self.alloc.alloc(max(len(data), 1), align if len(data) >= 512 else 16)
            self.mem.write(a, data)
            bufs.append((a, len(data), 0))
        out = []
        for n in writable:
            a = self.alloc.alloc(max(n, 1), align if n >= 512 else 16)
            self.mem.fill(a, n, 0xEE)
            bufs.append((a, n, VIRTQ_DESC_F_WRITE))
            out.append(a)
        if indirect:
            table = self.alloc.alloc(16 * len(bufs))
            for i, (a, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(i, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), i + 1, table)
            head = self.free
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self.free = (self.free + 1) % self.size
        else:
            head = self.free
            idxs = [(self.free + i) % self.size for i in range(len(bufs))]
            for i, (a, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(idxs[i], a, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else idxs[i + 1])
            self.free = (self.free + len(bufs)) % self.size
        self.publish(head)
        return head, out

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def get_used(self) -> list[tuple[int, int]]:
        """New (head, written) entries since the last call."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class VirtioDriver:
    """Drive a virtio-pci function at (slot, func) of a FakeVm."""

    def __init__(self, vm, slot: int, func: int = 0) -> None:
        self.vm = vm
        self.pci = PciDriver(vm)
        self.slot, self.func = slot, func
        self.caps: dict[int, tuple[int, int, int]] = {}   # cfg_type -> (bar, offset, length)
        self.notify_mult = 0
        self.msix_cap = 0
        for off, cap_id in self.pci.capabilities(slot, func):
            if cap_id == CAP_ID_VENDOR:
                cfg_type = self.pci.read(slot, func, off + 3, 1)
                bar = self.pci.read(slot, func, off + 4, 1)
                offset = self.pci.read(slot, func, off + 8)
                length = self.pci.read(slot, func, off + 12)
                self.caps.setdefault(cfg_type, (bar, offset, length))
                if cfg_type == 2:
                    self.notify_mult = self.pci.read(slot, func, off + 16)
            elif cap_id == CAP_ID_MSIX:
                self.msix_cap = off
        self.alloc = Allocator(0x100000, vm.memory.size)
        self.queues: list[MockVirtqueue] = []

    def _addr(self, cfg_type: int, offset: int) -> int:
        bar, base, _ = self.caps[cfg_type]
        return self.pci.bar_address(self.slot, self.func, bar) + base + offset

    def common_read(self, offset: int, size: int) -> int:
        return self.vm.mmio.read(self._addr(1, offset), size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.vm.mmio.write(self._addr(1, offset), size, value)

    def device_config(self, offset: int, size: int) -> int:
        return self.vm.mmio.read(self._addr(4, offset), size)

    def isr(self) -> int:
        return self.vm.mmio.read(self._addr(3, 0), 1)

    @property
    def status(self) -> int:
        return self.common_read(0x14, 1)

    def device_features(self) -> int:
        f = 0
        for sel in (0, 1):
            self.common_write(0x00, 4, sel)
            f |= self.common_read(0x04, 4) << (32 * sel)
        return f

    def setup(self, features: int | None = None, queue_sizes: list[int] | None = None,
              msix: bool = True) -> int:
        """Reset, negotiate, set up every queue, DRIVER_OK. Returns the accepted features."""
        self.common_write(0x14, 1, 0)
        self.common_write(0x14, 1, STATUS_ACKNOWLEDGE)
        self.common_write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = self.device_features()
        want = offered if features is None else features | VIRTIO_F_VERSION_1
        for sel in (0, 1):
            self.common_write(0x08, 4, sel)
            self.common_write(0x0C, 4, (want >> (32 * sel)) & 0xFFFFFFFF)
        self.common_write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if not self.status & STATUS_FEATURES_OK:
            raise RuntimeError("device refused the features")
        if msix and self.msix_cap:
            ctrl = self.pci.read(self.slot, self.func, self.msix_cap + 2, 2)
            self.pci.write(self.slot, self.func, self.msix_cap + 2, 2, ctrl | 0x8000)
            table_bar = self.pci.read(self.slot, self.func, self.msix_cap + 4) & 7
            table_base = self.pci.bar_address(self.slot, self.func, table_bar)
            for v in range((ctrl & 0x7FF) + 1):
                self.vm.mmio.write(table_base + 16 * v, 4, 0xFEE00000)
                self.vm.mmio.write(table_base + 16 * v + 4, 4, 0)
                self.vm.mmio.write(table_base + 16 * v + 8, 4, 0x30 + v)
                self.vm.mmio.write(table_base + 16 * v + 12, 4, 0)
            self.common_write(0x10, 2, 0)
        nq = self.common_read(0x12, 2)
        self.queues = []
        for i in range(nq):
            self.common_write(0x16, 2, i)
            size = self.common_read(0x18, 2)
            if queue_sizes is not None:
                size = queue_sizes[i]
                self.common_write(0x18, 2, size)
            q = MockVirtqueue(self.vm.memory, self.alloc, size)
            self.common_write(0x20, 4, q.desc)
            self.common_write(0x24, 4, 0)
            self.common_write(0x28, 4, q.avail)
            self.common_write(0x2C, 4, 0)
            self.common_write(0x30, 4, q.used)
            self.common_write(0x34, 4, 0)
            if msix and self.msix_cap:
                self.common_write(0x1A, 2, i + 1)
            self.common_write(0x1C, 2, 1)
            self.queues.append(q)
        self.common_write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                          | STATUS_DRIVER_OK)
        return want

    def kick(self, queue: int, wait: bool = True) -> None:
        """Notify ``queue``; with ``wait``, return once the event loop has served it."""
        self.common_write(0x16, 2, queue)
        off = self.common_read(0x1E, 2)
        self.vm.mmio.write(self._addr(2, off * self.notify_mult), 2, queue)
        if wait and hasattr(self.vm, "sync"):
            self.vm.sync()
