"""A VM without KVM: guest RAM, port and MMIO buses, a PCI root, recorded interrupts."""

from __future__ import annotations

import os

from vmrun.core import layout
from vmrun.core.bus import MmioBus, PortBus
from vmrun.core.host import HostContext
from vmrun.core.irq import RecordingIrqLine
from vmrun.core.memory import GuestMemory
from vmrun.core.pci import ConfigMechanism1, PciRoot


class RecordingDevice:
    """A bus device that records every access; reads answer ``value`` (masked by the bus to
    the access size, so give all 8 bytes to see a wrong mask)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class FakeVm:
    """Enough of :class:`vmrun.core.vm.Vm` for device logic tests.

    MSI-X vectors still get real eventfds (``irqfds`` maps GSI -> fd) so a test can see an
    interrupt as a counter; ioeventfds are only recorded (a write to a notify address reaches
    the device through the bus instead, which hands the work to the event loop). The devices'
    event loop runs on its own thread, as in a real VM; :meth:`sync` waits until it has done
    everything queued so far.
    """

    def __init__(self, memory: int = 16 * layout.MiB) -> None:
        self.host = HostContext()
        self.loop = self.host.loop
        self.loop.start()
        self.memory = GuestMemory.for_size(memory)
        self.pio = PortBus()
        self.mmio = MmioBus()
        self.irq_lines: dict[int, RecordingIrqLine] = {}
        self.msi_routes: dict[int, tuple[int, int]] = {}
        self.irqfds: dict[int, int] = {}
        self.ioeventfds: list[tuple[int, int, int]] = []
        self._next_gsi = 24
        self.memslots: dict[int, tuple[int, int, int, bool]] = {}   # slot -> gpa, size, hva, log
        self.dirty_pages: dict[int, set[int]] = {}
        self.pci = PciRoot(self, self.loop)  # type: ignore[arg-type]
        self.pio.insert(ConfigMechanism1(self.pci), layout.PCI_CONFIG_ADDRESS, 8)

    def irq_line(self, gsi: int, *, level_triggered: bool = False) -> RecordingIrqLine:
        return self.irq_lines.setdefault(gsi, RecordingIrqLine())

    def allocate_msi_gsi(self) -> int:
        self._next_gsi += 1
        return self._next_gsi - 1

    def set_msi_route(self, gsi: int, address: int, data: int | None) -> None:
        if data is None:
            self.msi_routes.pop(gsi, None)
        else:
            self.msi_routes[gsi] = (address, data)

    def register_irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        if deassign:
            self.irqfds.pop(gsi, None)
        else:
            self.irqfds[gsi] = fd

    def register_ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                           datamatch: int | None = None, deassign: bool = False) -> None:
        entry = (fd, addr, length)
        if deassign:
            self.ioeventfds.remove(entry)
        else:
            self.ioeventfds.append(entry)

    # -- device RAM slots, with a dirty log the test writes (mark_dirty) ----------------
    def add_memslot(self, gpa: int, size: int, hva: int, *, log_dirty: bool = False) -> int:
        slot = 16 + len(self.memslots)
        while slot in self.memslots:
            slot += 1
        self.memslots[slot] = (gpa, size, hva, log_dirty)
        self.dirty_pages[slot] = set()
        return slot

    def remove_memslot(self, slot: int) -> None:
        del self.memslots[slot]
        del self.dirty_pages[slot]

    def mark_dirty(self, gpa: int, length: int = 1) -> None:
        """What KVM would log for a guest write of ``length`` bytes at ``gpa``."""
        for slot, (base, size, _hva, log) in self.memslots.items():
            if log and base <= gpa < base + size:
                for page in range((gpa - base) >> 12, ((gpa - base + length - 1) >> 12) + 1):
                    self.dirty_pages[slot].add(page)

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        bitmap = bytearray((((size + 4095) >> 12) + 7) // 8)
        for page in self.dirty_pages[slot]:
            bitmap[page >> 3] |= 1 << (page & 7)
        self.dirty_pages[slot].clear()
        return bytes(bitmap)

    def msi_count(self, gsi: int) -> int:
        """How many times the irqfd of ``gsi`` fired since the last call."""
        try:
            return os.eventfd_read(self.irqfds[gsi])
        except BlockingIOError:
            return 0

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until the event loop has run everything queued before this call."""
        if not self.loop.sync(timeout):
            raise TimeoutError("the event loop did not get through its queue")

    def close(self) -> None:
        self.pci.close()
        self.host.close()
        self.memory.close()
