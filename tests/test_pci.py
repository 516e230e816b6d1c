"""PCI config space, BAR sizing and decoding, ECAM, MSI-X table and MSI capability semantics."""

from __future__ import annotations

import os
import time

import pytest

from vmrun.core import layout
from vmrun.core.msi import MSI_64BIT, MSI_PER_VECTOR_MASK, MsiCapability
from vmrun.core.msix import MsixVectors
from vmrun.core.pci import BAR_IO, BAR_MEM32, BAR_MEM64, CAP_ID_MSI, BarSpec, Ecam, PciDevice
from vmrun.testing import FakeVm, PciDriver


class Dev(PciDevice):
    vendor_id, device_id, class_code, interrupt_pin = 0x1234, 0xABCD, 0x020000, 1
    bars = [BarSpec(0, 0x1000, BAR_MEM32), BarSpec(2, 0x100, BAR_IO),
            BarSpec(4, 0x100000, BAR_MEM64)]

    def __init__(self) -> None:
        self.accesses: list[tuple] = []

    def bar_read(self, index: int, offset: int, size: int) -> int:
        self.accesses.append(("r", index, offset, size))
        return 0x11223344 & ((1 << (8 * size)) - 1)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", index, offset, size, value))


@pytest.fixture
def vm():
    v = FakeVm()
    yield v
    v.close()


def test_enumeration_and_bar_sizing(vm: FakeVm) -> None:
    dev = Dev()
    vm.pci.add(dev, 3)
    vm.pci.assign_bars()
    drv = PciDriver(vm)
    assert drv.scan() == {(3, 0): (0x1234, 0xABCD)}
    assert drv.read(3, 0, 0x08) >> 8 == 0x020000
    assert drv.bar_size(3, 0, 0) == 0x1000
    assert drv.bar_size(3, 0, 2) == 0x100
    assert drv.bar_size(3, 0, 4) == 0x100000
    assert drv.read(3, 0, 0x10 + 16) & 0x6 == 0x4         # 64-bit memory BAR
    assert drv.read(3, 0, 0x3C, 1) == 16 + (3 + 1 - 1) % 8  # INTA# routed like the _PRT says
    assert drv.read(3, 0, 0x3D, 1) == 1
    assert drv.read(7, 0, 0) == 0xFFFFFFFF                  # nothing there


def test_bar_decoding_follows_command_and_moves(vm: FakeVm) -> None:
    dev = Dev()
    vm.pci.add(dev, 3)
    vm.pci.assign_bars()
    drv = PciDriver(vm)
    base = drv.bar_address(3, 0, 0)
    assert vm.mmio.read(base + 8, 4) == 0x11223344
    assert dev.accesses[-1] == ("r", 0, 8, 4)
    io = drv.bar_address(3, 0, 2)
    vm.pio.write(io + 2, 1, 0x5A)
    assert dev.accesses[-1] == ("w", 2, 2, 1, 0x5A)
    drv.write(3, 0, 0x04, 2, 0)                             # decoding off
    assert vm.mmio.read(base + 8, 4) == 0xFFFFFFFF
    drv.write(3, 0, 0x10, 4, 0xD0000000)                    # the guest moves BAR0
    drv.enable(3, 0)
    assert vm.mmio.read(0xD0000000 + 4, 4) == 0x11223344
    assert vm.mmio.read(base + 4, 4) == 0xFFFFFFFF


def test_read_only_header_fields(vm: FakeVm) -> None:
    vm.pci.add(Dev(), 3)
    vm.pci.assign_bars()
    drv = PciDriver(vm)
    drv.write(3, 0, 0x00, 4, 0)
    drv.write(3, 0, 0x08, 4, 0)
    assert drv.read(3, 0, 0) == (0xABCD << 16) | 0x1234
    assert drv.read(3, 0, 0x08) >> 8 == 0x020000


def test_ecam_reaches_the_same_config_space(vm: FakeVm) -> None:
    vm.pci.add(Dev(), 3)
    ecam = Ecam(vm.pci)
    assert ecam.read((3 << 15) | 0, 4) == (0xABCD << 16) | 0x1234
    assert ecam.read((1 << 20) | (3 << 15), 4) == 0xFFFFFFFF   # bus 1: nothing
    assert layout.ECAM_BASE % (1 << 28) == 0


def test_slot_taken(vm: FakeVm) -> None:
    vm.pci.add(Dev(), 3)
    with pytest.raises(Exception, match="slot 3:0 is taken"):
        vm.pci.add(Dev(), 3)


def test_msix_masking_pending_and_delivery(vm: FakeVm) -> None:
    m = MsixVectors(4, 1, 0, 1, 0x800, vm=vm)  # type: ignore[arg-type]

    class Holder(PciDevice):
        bars = [BarSpec(1, 0x1000, BAR_MEM32)]

    h = Holder()
    vm.pci.add(h, 4)
    m.add_capability(h.config)
    m.realize()
    cap = m.cap_offset
    ctrl = lambda: int.from_bytes(h.config.data[cap + 2:cap + 4], "little")  # noqa: E731
    assert ctrl() & 0x7FF == 3                                # table size - 1
    h.config.write(cap + 2, 2, 0x8000)                        # enable
    m.notify(1)                                               # vector masked at reset
    assert m.pba_read(0, 8) == 0b10 and vm.msi_count(m.gsis[1]) == 0
    m.table_write(16 + 0, 4, 0xFEE00000)
    m.table_write(16 + 8, 4, 0x41)
    assert vm.msi_routes[m.gsis[1]] == (0xFEE00000, 0x41)
    m.table_write(16 + 12, 4, 0)                              # unmask: pending delivered
    assert vm.msi_count(m.gsis[1]) == 1 and m.pba_read(0, 8) == 0
    m.notify(1)
    assert vm.msi_count(m.gsis[1]) == 1
    h.config.write(cap + 2, 2, 0xC000)                        # function mask
    m.notify(1)
    assert vm.msi_count(m.gsis[1]) == 0 and m.pba_read(0, 8) == 0b10
    h.config.write(cap + 2, 2, 0x8000)
    m.control_changed()
    assert vm.msi_count(m.gsis[1]) == 1
    m.notify(9)                                               # out of range: ignored
    assert m.table_read(16 * 4, 4) == 0                       # beyond the table
    m.close()


class MsiDev(PciDevice):
    """A device with a 4-vector MSI capability and INTA# (for the fallback): it declares the
    vectors, the core builds and wires them."""

    vendor_id, device_id, class_code, interrupt_pin = 0x1234, 0x5678, 0xFF0000, 1
    msi_vectors = 4


def test_msi_capability_routes_masks_and_pending(vm: FakeVm) -> None:
    dev = MsiDev()
    vm.pci.add(dev, 5)
    vm.pci.assign_bars()
    drv = PciDriver(vm)
    cap = {cap_id: off for off, cap_id in drv.capabilities(5, 0)}[CAP_ID_MSI]
    ctrl = drv.read(5, 0, cap + 2, 2)
    assert ctrl & MSI_64BIT and ctrl & MSI_PER_VECTOR_MASK and (ctrl >> 1) & 7 == 2  # 4 vectors
    msi = dev.irq.msi
    msi.notify(0)                                               # not enabled: dropped
    assert [vm.msi_count(g) for g in msi.gsis] == [0, 0, 0, 0]
    drv.write(5, 0, cap + 4, 4, 0xFEE01003)                     # low 2 bits are reserved
    drv.write(5, 0, cap + 8, 4, 0)
    drv.write(5, 0, cap + 12, 2, 0x4000 | 0x50)
    drv.write(5, 0, cap + 2, 2, 0x0021 | 0x000E)               # enable, MME=2 (4); MMC is RO
    assert (drv.read(5, 0, cap + 2, 2) >> 1) & 7 == 2
    assert [vm.msi_routes[g] for g in msi.gsis] == [(0xFEE01000, 0x4050 + v) for v in range(4)]
    msi.notify(2)
    assert vm.msi_count(msi.gsis[2]) == 1
    drv.write(5, 0, cap + 16, 4, 0b0010)                        # mask vector 1
    msi.notify(1)
    assert vm.msi_count(msi.gsis[1]) == 0 and drv.read(5, 0, cap + 20, 4) == 0b0010
    drv.write(5, 0, cap + 20, 4, 0)                             # pending bits are read-only
    assert drv.read(5, 0, cap + 20, 4) == 0b0010
    drv.write(5, 0, cap + 16, 4, 0)                             # unmask: the pending one fires
    assert vm.msi_count(msi.gsis[1]) == 1 and drv.read(5, 0, cap + 20, 4) == 0
    drv.write(5, 0, cap + 2, 2, 0x0011)                         # MME=1: only 2 vectors now
    assert vm.msi_routes[msi.gsis[1]] == (0xFEE01000, 0x4051)
    msi.notify(3)
    msi.notify(-1)
    assert vm.msi_count(msi.gsis[3]) == 0
    vm.pci.reset()                                              # machine reset: disabled, clean
    assert not msi.enabled and drv.read(5, 0, cap + 4, 4) == 0
    assert (drv.read(5, 0, cap + 2, 2) >> 1) & 7 == 2


def test_msi_vector_counts_are_checked() -> None:
    with pytest.raises(ValueError):
        MsiCapability(3)
    m = MsiCapability(1)
    m.notify(0)                                                 # no config space yet: nothing
    assert m.fired == []


class MsixDev(PciDevice):
    """Three MSI-X vectors and plain MSI, INTA# as the last resort."""

    vendor_id, device_id, class_code, interrupt_pin = 0x1234, 0x5679, 0xFF0000, 1
    bars = [BarSpec(0, 0x1000, BAR_MEM32)]
    msix_vectors, msix_bar, msi_vectors = 3, 2, 1


def _msix_table(vm: FakeVm, drv: PciDriver, slot: int) -> tuple[int, int]:
    cap = {cap_id: off for off, cap_id in drv.capabilities(slot, 0)}[0x11]
    bir = drv.read(slot, 0, cap + 4) & 7
    return cap, drv.bar_address(slot, 0, bir)


def test_interrupt_source_falls_back_msix_msi_intx(vm: FakeVm) -> None:
    dev = MsixDev()
    vm.pci.add(dev, 6)
    vm.pci.assign_bars()
    drv = PciDriver(vm)
    irq = dev.irq
    assert irq is not None and irq.mode == "intx"
    intx = vm.irq_lines[dev.config.data[0x3C]]
    irq.trigger(1)                                       # nothing enabled: INTA#
    assert intx.level and dev.config.status & 0x8
    irq.deassert()
    assert not intx.level
    msi_cap = {cap_id: off for off, cap_id in drv.capabilities(6, 0)}[CAP_ID_MSI]
    drv.write(6, 0, msi_cap + 4, 4, 0xFEE00000)
    drv.write(6, 0, msi_cap + 12, 2, 0x41)
    drv.write(6, 0, msi_cap + 2, 2, 0x0001)              # MSI on
    assert irq.mode == "msi"
    irq.trigger(2)                                       # folded onto the one MSI vector
    assert vm.msi_count(irq.msi.gsis[0]) == 1 and not intx.level
    cap, table = _msix_table(vm, drv, 6)
    drv.write(6, 0, cap + 2, 2, 0x8000)                  # MSI-X wins over MSI
    assert irq.mode == "msix"
    for v in range(3):
        vm.mmio.write(table + 16 * v, 4, 0xFEE00000)
        vm.mmio.write(table + 16 * v + 8, 4, 0x50 + v)
        vm.mmio.write(table + 16 * v + 12, 4, 0)
    irq.trigger(2)
    assert vm.msi_count(irq.msix.gsis[2]) == 1
    assert dev.bars[-1].index == 2                       # the core added the MSI-X BAR
    vm.pci.reset()
    assert irq.mode == "intx"


def test_msix_qword_write_spanning_two_entries_updates_both(vm: FakeVm) -> None:
    """An 8-byte write at entry 0's vector control (offset 12) also carries entry 1's
    address low: both entries change, and entry 1 is re-routed."""
    dev = MsixDev()
    vm.pci.add(dev, 7)
    vm.pci.assign_bars()
    drv = PciDriver(vm)
    cap, table = _msix_table(vm, drv, 7)
    drv.write(7, 0, cap + 2, 2, 0x8000)
    m = dev.irq.msix
    vm.mmio.write(table + 16 + 8, 4, 0x61)               # entry 1 data
    vm.mmio.write(table + 12, 8, (0xFEE01000 << 32) | 0)  # unmask 0 + entry 1 address
    assert m.entry(0)[2] == 0
    assert m.entry(1)[0] == 0xFEE01000
    assert vm.msi_routes[m.gsis[1]] == (0xFEE01000, 0x61)
    vm.mmio.write(table + 2, 4, 0xFFFFFFFF)              # misaligned: ignored
    assert m.entry(0)[0] == 0


def test_no_msi_with_bus_mastering_off_and_msix_helper(vm: FakeVm) -> None:
    dev = MsixDev()
    vm.pci.add(dev, 8)
    vm.pci.assign_bars()
    drv = PciDriver(vm)
    drv.enable_msix(8, 0)
    irq = dev.irq
    cmd = drv.read(8, 0, 4, 2)
    drv.write(8, 0, 4, 2, cmd & ~0x4)                     # bus mastering off
    irq.trigger(0)
    assert vm.msi_count(irq.msix.gsis[0]) == 0
    drv.write(8, 0, 4, 2, cmd)
    irq.trigger(0)
    assert vm.msi_count(irq.msix.gsis[0]) == 1


def test_a_faulted_device_serves_its_doorbells_again_after_reset(vm: FakeVm) -> None:
    rung: list[int] = []

    class Bell(PciDevice):
        vendor_id, device_id = 0x1234, 0x1111
        bars = [BarSpec(0, 0x1000, BAR_MEM32)]

        def realize(self) -> None:
            self.add_doorbell(0, 0x10, 4, lambda: rung.append(1))

    dev = Bell()
    vm.pci.add(dev, 9)
    vm.pci.assign_bars()
    (fd, addr, length), = [e for e in vm.ioeventfds if e[1] == dev.config.bar_address(0) + 0x10]
    os.eventfd_write(fd, 1)                               # what KVM does on a guest write
    vm.sync()
    time.sleep(0.05)
    vm.sync()
    assert rung == [1]
    dev.fault("test")
    os.eventfd_write(fd, 1)
    time.sleep(0.05)
    vm.sync()
    assert rung == [1]
    vm.pci.reset()
    time.sleep(0.05)
    vm.sync()
    assert rung == [1, 1]                                 # the pending ring, now served
