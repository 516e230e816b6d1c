"""MSI-X: the capability, the vector table and the pending-bit array (PCI 3.0, 6.8.2).

Each vector owns a KVM GSI routed to the message the guest wrote in its table entry and an
eventfd registered as an irqfd (:class:`vmrun.core.msi.MessageRoutes`, shared with plain MSI),
so a device thread raises an interrupt with one ``eventfd_write`` — no exit, no ioctl. A
masked vector (per-vector mask or the function mask) sets its pending bit instead; unmasking
delivers it.

For tests and VMs without KVM, ``MsixVectors(vm=None)`` records deliveries in ``fired``.
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING

from vmrun.core.msi import MessageRoutes, RoutedVectors

if TYPE_CHECKING:
    from vmrun.core.pci import ConfigSpace
    from vmrun.core.vm import Vm

CAP_ID_MSIX = 0x11
ENTRY_SIZE = 16
CTRL_ENABLE = 1 << 15
CTRL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1


class MsixVectors(RoutedVectors):
    def __init__(self, nvectors: int, table_bar: int, table_offset: int, pba_bar: int,
                 pba_offset: int, vm: Vm | None = None) -> None:
        if not 1 <= nvectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        self.n = nvectors
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.routes = MessageRoutes(nvectors, vm)
        self.table = bytearray(ENTRY_SIZE * nvectors)
        self.pending = [False] * nvectors
        self.cap_offset = -1
        self.config: ConfigSpace | None = None
        self.lock = threading.Lock()
        self.reset()

    @property
    def table_size(self) -> int:
        return ENTRY_SIZE * self.n

    @property
    def pba_size(self) -> int:
        return ((self.n + 63) // 64) * 8

    def add_capability(self, config: ConfigSpace) -> int:
        body = struct.pack("<HII", self.n - 1, self.table_offset | self.table_bar,
                           self.pba_offset | self.pba_bar)
        writable = struct.pack("<HII", CTRL_ENABLE | CTRL_FUNCTION_MASK, 0, 0)
        self.cap_offset = config.add_capability(CAP_ID_MSIX, body, writable)
        self.config = config
        return self.cap_offset

    def realize(self) -> None:
        """Allocate one GSI and one irqfd per vector (needs a VM)."""
        self.routes.realize()

    def close(self) -> None:
        self.routes.close()

    def reset(self) -> None:
        with self.lock:
            for i in range(self.n):
                struct.pack_into("<QII", self.table, i * ENTRY_SIZE, 0, 0, VECTOR_MASKED)
                self.pending[i] = False

    # -- state ------------------------------------------------------------------------
    @property
    def control(self) -> int:
        if self.config is None:
            return CTRL_ENABLE
        return struct.unpack_from("<H", self.config.data, self.cap_offset + 2)[0]

    @property
    def enabled(self) -> bool:
        return bool(self.control & CTRL_ENABLE)

    def entry(self, vector: int) -> tuple[int, int, int]:
        return struct.unpack_from("<QII", self.table, vector * ENTRY_SIZE)

    def _masked(self, vector: int) -> bool:
        return bool(self.control & CTRL_FUNCTION_MASK) or bool(
            self.entry(vector)[2] & VECTOR_MASKED)

    # -- guest accesses (the BARs that hold the table and the PBA) ------------------------
    def table_read(self, offset: int, size: int) -> int:
        if offset + size > self.table_size:
            return 0
        return int.from_bytes(self.table[offset:offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        """A guest write to the table: DWORD or aligned QWORD (PCI 3.0, 6.8.2); anything
        else is ignored. A QWORD is two DWORD writes, each applied to its own entry, so one
        that spans two entries (a vector's control word and the next one's address) updates
        both."""
        if size not in (4, 8) or offset % 4 or offset + size > self.table_size:
            return
        if size == 8:
            self._table_dword(offset, value & 0xFFFFFFFF)
            self._table_dword(offset + 4, value >> 32)
        else:
            self._table_dword(offset, value)

    def _table_dword(self, offset: int, value: int) -> None:
        vector = offset // ENTRY_SIZE
        with self.lock:
            was_masked = self._masked(vector)
            self.table[offset:offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
            addr, data, _ctrl = self.entry(vector)
            self.routes.route(vector, addr, data)
            deliver = was_masked and not self._masked(vector) and self.pending[vector]
            if deliver:
                self.pending[vector] = False
        if deliver:
            self.routes.signal(vector)

    def pba_read(self, offset: int, size: int) -> int:
        value = 0
        for bit in range(offset * 8, min((offset + size) * 8, self.n)):
            if self.pending[bit]:
                value |= 1 << (bit - offset * 8)
        return value

    def control_changed(self) -> None:
        """Call after a guest write to the capability (enable / function mask)."""
        if not self.enabled:
            return
        for v in range(self.n):
            with self.lock:
                deliver = self.pending[v] and not self._masked(v)
                if deliver:
                    self.pending[v] = False
            if deliver:
                self.routes.signal(v)

    # -- device side -------------------------------------------------------------------
    def notify(self, vector: int) -> None:
        """The device raises ``vector`` (from any thread)."""
        if not 0 <= vector < self.n or not self.enabled:
            return
        with self.lock:
            if self._masked(vector):
                self.pending[vector] = True
                return
        self.routes.signal(vector)
