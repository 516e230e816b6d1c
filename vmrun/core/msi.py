"""MSI (PCI 3.0, 6.8.1) and the per-vector KVM routes it shares with MSI-X.

:class:`MessageRoutes` is what both capabilities have in common: each vector owns a KVM GSI
routed to the message (address, data) the guest programmed, and an eventfd registered as an
irqfd for that GSI. A device thread raises a vector with one ``eventfd_write`` — no exit, no
ioctl. The KVM routing table is only pushed when a vector's message actually changes.

:class:`MsiCapability` is the plain MSI capability: 64-bit message address, 1..32 vectors
(multiple message enable), per-vector masking with pending bits. Unlike MSI-X, its registers
live in configuration space, so the core calls :meth:`MsiCapability.config_changed` after
each guest config write that touches it (``PciDevice.config_changed`` does that for a device
that sets ``self.msi``).

Without a VM (``vm=None``) deliveries are recorded in ``fired`` for tests.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmrun.core.pci import ConfigSpace
    from vmrun.core.vm import Vm

CAP_ID_MSI = 0x05

# Message Control bits.
MSI_ENABLE = 1 << 0
MSI_MMC_SHIFT = 1          # multiple message capable: log2(vectors), read-only
MSI_MME_SHIFT = 4          # multiple message enable: log2(vectors the driver allocated)
MSI_64BIT = 1 << 7
MSI_PER_VECTOR_MASK = 1 << 8

# Register offsets inside the 64-bit, per-vector-maskable layout (from the capability start).
MSI_CONTROL = 2
MSI_ADDRESS_LO = 4
MSI_ADDRESS_HI = 8
MSI_DATA = 12
MSI_MASK = 16
MSI_PENDING = 20
MSI_CAP_SIZE = 24


class MessageRoutes:
    """One KVM GSI and irqfd per vector, routed to the message the guest programmed."""

    def __init__(self, n: int, vm: Vm | None) -> None:
        self.n = n
        self.vm = vm
        self.gsis: list[int] = []
        self.eventfds: list[int] = []
        self.routes: list[tuple[int, int] | None] = [None] * n
        self.fired: list[int] = []

    def realize(self) -> None:
        """Allocate the GSIs and irqfds (needs a VM; a no-op without one or when done)."""
        if self.vm is None or self.gsis:
            return
        for _ in range(self.n):
            gsi = self.vm.allocate_msi_gsi()
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.vm.register_irqfd(fd, gsi)
            self.gsis.append(gsi)
            self.eventfds.append(fd)

    def route(self, vector: int, address: int, data: int) -> None:
        """Point ``vector``'s GSI at the message, pushing the table only on a change."""
        if not self.gsis:
            return
        if self.routes[vector] != (address, data):
            self.routes[vector] = (address, data)
            assert self.vm is not None
            self.vm.set_msi_route(self.gsis[vector], address, data)

    def signal(self, vector: int) -> None:
        if self.eventfds:
            os.eventfd_write(self.eventfds[vector], 1)
        else:
            self.fired.append(vector)

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []


class RoutedVectors:
    """What MSI and MSI-X expose of their :class:`MessageRoutes` (``self.routes``)."""

    routes: MessageRoutes

    @property
    def vm(self) -> Vm | None:
        return self.routes.vm

    @vm.setter
    def vm(self, vm: Vm | None) -> None:
        self.routes.vm = vm

    @property
    def fired(self) -> list[int]:
        return self.routes.fired

    @property
    def gsis(self) -> list[int]:
        return self.routes.gsis


class MsiCapability(RoutedVectors):
    """A plain MSI capability with ``nvectors`` (a power of two, 1..32) maskable vectors."""

    def __init__(self, nvectors: int = 1, vm: Vm | None = None) -> None:
        if nvectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI supports 1, 2, 4, 8, 16 or 32 vectors")
        self.n = nvectors
        self.routes = MessageRoutes(nvectors, vm)
        self.cap_offset = -1
        self.config: ConfigSpace | None = None
        self.lock = threading.Lock()

    def add_capability(self, config: ConfigSpace) -> int:
        control = MSI_64BIT | MSI_PER_VECTOR_MASK | (
            (self.n.bit_length() - 1) << MSI_MMC_SHIFT)
        body = struct.pack("<HIIHHII", control, 0, 0, 0, 0, 0, 0)
        writable = struct.pack("<HIIHHII", MSI_ENABLE | (0x7 << MSI_MME_SHIFT), 0xFFFFFFFC,
                               0xFFFFFFFF, 0xFFFF, 0, (1 << self.n) - 1, 0)
        self.cap_offset = config.add_capability(CAP_ID_MSI, body, writable)
        self.config = config
        return self.cap_offset

    def realize(self) -> None:
        self.routes.realize()

    def close(self) -> None:
        self.routes.close()

    def reset(self) -> None:
        """Power-on state: disabled, no message, nothing masked or pending."""
        if self.config is None:
            return
        with self.lock:
            c = self.config.data
            off = self.cap_offset
            control = struct.unpack_from("<H", c, off + MSI_CONTROL)[0]
            struct.pack_into("<H", c, off + MSI_CONTROL, control & ~(MSI_ENABLE | (
                0x7 << MSI_MME_SHIFT)))
            c[off + MSI_ADDRESS_LO:off + MSI_CAP_SIZE] = bytes(MSI_CAP_SIZE - MSI_ADDRESS_LO)

    # -- state read from config space ------------------------------------------------------
    def _reg(self, offset: int, fmt: str = "<I") -> int:
        assert self.config is not None
        return struct.unpack_from(fmt, self.config.data, self.cap_offset + offset)[0]

    @property
    def control(self) -> int:
        return self._reg(MSI_CONTROL, "<H") if self.config is not None else 0

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSI_ENABLE)

    @property
    def vectors_enabled(self) -> int:
        """How many vectors the driver allocated (MME), never more than the device has."""
        return min(self.n, 1 << ((self.control >> MSI_MME_SHIFT) & 0x7))

    def message(self, vector: int) -> tuple[int, int]:
        """The (address, data) of ``vector``: vector numbers go in the data's low bits."""
        address = self._reg(MSI_ADDRESS_LO) | (self._reg(MSI_ADDRESS_HI) << 32)
        data = self._reg(MSI_DATA, "<H")
        n = self.vectors_enabled
        return address, (data & ~(n - 1)) | vector

    def overlaps(self, offset: int, size: int) -> bool:
        return self.cap_offset >= 0 and offset < self.cap_offset + MSI_CAP_SIZE \
            and offset + size > self.cap_offset

    def _set_pending(self, vector: int, on: bool) -> None:
        assert self.config is not None
        off = self.cap_offset + MSI_PENDING
        bits = struct.unpack_from("<I", self.config.data, off)[0]
        bits = (bits | (1 << vector)) if on else (bits & ~(1 << vector))
        struct.pack_into("<I", self.config.data, off, bits)

    # -- guest side ------------------------------------------------------------------------
    def config_changed(self) -> None:
        """After a guest write to the capability: re-route, and deliver what got unmasked."""
        if self.config is None or not self.enabled:
            return
        deliver = []
        with self.lock:
            mask = self._reg(MSI_MASK)
            pending = self._reg(MSI_PENDING)
            for v in range(self.vectors_enabled):
                self.routes.route(v, *self.message(v))
                if pending & (1 << v) and not mask & (1 << v):
                    self._set_pending(v, False)
                    deliver.append(v)
        for v in deliver:
            self.routes.signal(v)

    # -- device side -----------------------------------------------------------------------
    def notify(self, vector: int = 0) -> None:
        """The device raises ``vector`` (from any thread); a masked one becomes pending."""
        if not self.enabled or not 0 <= vector < self.vectors_enabled:
            return
        with self.lock:
            if self._reg(MSI_MASK) & (1 << vector):
                self._set_pending(vector, True)
                return
        self.routes.signal(vector)
