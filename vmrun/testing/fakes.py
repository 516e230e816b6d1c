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
        self.pci = PciRoot(self, self.loop)  # type: ignore[arg-type]
        self.pio.insert(ConfigMechanism1(self.pci), layout.PCI_CONFIG_ADDRESS, 8)

    def irq_line(self, gsi: int) -> RecordingIrqLine:
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
