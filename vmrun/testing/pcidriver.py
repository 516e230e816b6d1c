"""A PCI configuration-space driver for tests: what an OS does at enumeration time."""

from __future__ import annotations

from vmrun.core import layout
from vmrun.core.pci import BAR0, CAPABILITIES_POINTER, COMMAND, STATUS, STATUS_CAP_LIST


class PciDriver:
    def __init__(self, vm) -> None:
        self.vm = vm

    def _address(self, slot: int, func: int, offset: int) -> None:
        self.vm.pio.write(layout.PCI_CONFIG_ADDRESS, 4,
                          0x8000_0000 | (slot << 11) | (func << 8) | (offset & 0xFC))

    def read(self, slot: int, func: int, offset: int, size: int = 4) -> int:
        self._address(slot, func, offset)
        return self.vm.pio.read(layout.PCI_CONFIG_ADDRESS + 4 + (offset & 3), size)

    def write(self, slot: int, func: int, offset: int, size: int, value: int) -> None:
        self._address(slot, func, offset)
        self.vm.pio.write(layout.PCI_CONFIG_ADDRESS + 4 + (offset & 3), size, value)

    def scan(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(slot, func) -> (vendor, device) for every function present on bus 0."""
        found = {}
        for slot in range(32):
            for func in range(8):
                ids = self.read(slot, func, 0)
                if ids != 0xFFFFFFFF:
                    found[(slot, func)] = (ids & 0xFFFF, ids >> 16)
        return found

    def bar_size(self, slot: int, func: int, index: int) -> int:
        """Size a BAR the way firmware does: write all ones, read the mask, restore."""
        off = BAR0 + 4 * index
        orig = self.read(slot, func, off)
        self.write(slot, func, off, 4, 0xFFFFFFFF)
        mask = self.read(slot, func, off)
        self.write(slot, func, off, 4, orig)
        if mask == 0:
            return 0
        if orig & 1:
            return (~(mask & 0xFFFFFFFC) & 0xFFFF) + 1
        return (~(mask & 0xFFFFFFF0) & 0xFFFFFFFF) + 1

    def bar_address(self, slot: int, func: int, index: int) -> int:
        low = self.read(slot, func, BAR0 + 4 * index)
        if low & 1:
            return low & 0xFFFFFFFC
        addr = low & 0xFFFFFFF0
        if low & 0x6 == 0x4:
            addr |= self.read(slot, func, BAR0 + 4 * index + 4) << 32
        return addr

    def capabilities(self, slot: int, func: int) -> list[tuple[int, int]]:
        """(offset, cap id) along the capability list (bounded: a loop cannot hang us)."""
        caps = []
        if not self.read(slot, func, STATUS, 2) & STATUS_CAP_LIST:
            return caps
        ptr = self.read(slot, func, CAPABILITIES_POINTER, 1) & 0xFC
        while ptr and len(caps) < 48:
            caps.append((ptr, self.read(slot, func, ptr, 1)))
            ptr = self.read(slot, func, ptr + 1, 1) & 0xFC
        return caps

    def enable_msix(self, slot: int, func: int, base_vector: int = 0x30) -> list[int]:
        """Enable MSI-X as an OS would: every table entry to the LAPIC with vector
        ``base_vector + i``, unmasked. Returns the table entries' guest addresses."""
        caps = {cap_id: off for off, cap_id in self.capabilities(slot, func)}
        cap = caps[0x11]
        ctrl = self.read(slot, func, cap + 2, 2)
        table = self.read(slot, func, cap + 4)
        base = self.bar_address(slot, func, table & 7) + (table & ~7)
        entries = []
        for v in range((ctrl & 0x7FF) + 1):
            e = base + 16 * v
            self.vm.mmio.write(e, 4, 0xFEE00000)
            self.vm.mmio.write(e + 4, 4, 0)
            self.vm.mmio.write(e + 8, 4, base_vector + v)
            self.vm.mmio.write(e + 12, 4, 0)
            entries.append(e)
        self.write(slot, func, cap + 2, 2, (ctrl & 0x3FFF) | 0x8000)
        return entries

    def enable(self, slot: int, func: int, bits: int = 0x7) -> None:
        cmd = self.read(slot, func, COMMAND, 2)
        self.write(slot, func, COMMAND, 2, cmd | bits)
