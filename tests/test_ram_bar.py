"""RAM-backed BARs: host memory mapped into the guest as a KVM memory slot while decoded,
moved with the BAR, unmapped when decoding is off; the dirty page log and its probe."""

from __future__ import annotations

import os

import pytest

from vmrun.core import kvm
from vmrun.core.dirty_log import PROBE_CODE, dirty_log_works
from vmrun.core.pci import BAR_IO, BAR_MEM32, BarSpec, PciDevice, PciRoot
from vmrun.testing import FakeVm, PciDriver

FB = 0x40000


class Fb(PciDevice):
    vendor_id, device_id, class_code = 0x1234, 0x1111, 0x038000
    bars = [BarSpec(0, 0x40000, BAR_MEM32, prefetchable=True, ram=True),
            BarSpec(2, 0x1000, BAR_MEM32)]

    def __init__(self) -> None:
        self.moves: list[tuple[int, int | None, int | None]] = []

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        self.moves.append((index, old, new))


@pytest.fixture
def vm():
    v = FakeVm()
    yield v
    v.close()


def test_ram_bar_spec_is_checked() -> None:
    with pytest.raises(ValueError):
        BarSpec(0, 0x100, BAR_IO, ram=True)
    with pytest.raises(ValueError):
        BarSpec(0, 0x100, BAR_MEM32, ram=True)     # less than a page


def test_ram_bar_is_a_memslot_that_follows_the_bar(vm: FakeVm) -> None:
    dev = Fb()
    vm.pci.add(dev, 3)
    vm.pci.assign_bars()
    ram = dev.ram_bars[0]
    drv = PciDriver(vm)
    assert drv.read(3, 0, 0x10) & 0xF == 0x8              # prefetchable 32-bit memory
    assert drv.bar_size(3, 0, 0) == 0x40000
    base = drv.bar_address(3, 0, 0)
    assert ram.gpa == base and ram.slot in vm.memslots
    assert vm.memslots[ram.slot] == (base, 0x40000, ram.hva, True)
    # An access that does exit (no memslot in a test) still reaches the same buffer.
    vm.mmio.write(base + 0x10, 4, 0xAABBCCDD)
    assert bytes(ram.view[0x10:0x14]) == b"\xdd\xcc\xbb\xaa"
    assert vm.mmio.read(base + 0x10, 2) == 0xCCDD
    gen = ram.generation
    drv.write(3, 0, 0x04, 2, 0)                            # decoding off: unmapped
    assert ram.gpa is None and ram.slot is None and not vm.memslots
    assert ram.dirty_log() is None
    drv.write(3, 0, 0x10, 4, 0xD0000000)                   # moved
    drv.enable(3, 0)
    assert ram.gpa == 0xD0000000 and vm.memslots[ram.slot][0] == 0xD0000000
    assert ram.generation > gen
    assert bytes(ram.view[0x10:0x14]) == b"\xdd\xcc\xbb\xaa"   # the contents stay
    assert (0, None, 0xD0000000) in dev.moves


def test_dirty_log_of_a_ram_bar(vm: FakeVm) -> None:
    dev = Fb()
    vm.pci.add(dev, 3)
    vm.pci.assign_bars()
    ram = dev.ram_bars[0]
    assert ram.dirty_log() == bytes(8)
    vm.mark_dirty(ram.gpa + 0x1000, 4)
    vm.mark_dirty(ram.gpa + 0x3FFF, 2)                     # spans pages 3 and 4
    log = ram.dirty_log()
    assert log[0] == 0b11010 and not any(log[1:])
    assert ram.dirty_log() == bytes(8)                    # the log is re-armed


def test_a_bar_placed_over_another_slot_is_not_decoded(vm: FakeVm) -> None:
    dev = Fb()
    vm.pci.add(dev, 3)
    vm.pci.assign_bars()
    ram = dev.ram_bars[0]
    mmio_base = PciDriver(vm).bar_address(3, 0, 2)
    drv = PciDriver(vm)
    drv.write(3, 0, 0x10, 4, mmio_base)                    # on top of BAR2: refused
    assert ram.gpa is None and not vm.memslots


def _real_mode(vm, code: bytes) -> None:
    vm.memory.write(0x1000, code)
    v = vm.vcpus[0]
    s = v.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    v.set_sregs(s)
    r = kvm.ffi.new("struct kvm_regs *")
    r.rip, r.rflags = 0x1000, 2
    v.set_regs(r)
    kvm.ioctl(v.fd, kvm.KVM_RUN, 0)
    assert v.run.exit_reason == kvm.KVM_EXIT_HLT, v.run.exit_reason


def _store_code(segment: int) -> bytes:
    """PROBE_CODE with another data segment: bytes 1 at seg:0x1000, seg:0x3000, seg:0x7000."""
    return bytes([0xB8, segment & 0xFF, segment >> 8]) + PROBE_CODE[3:]


@pytest.mark.kvm
def test_guest_writes_reach_the_ram_bar_without_exits() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm")
    from vmrun.core.vm import Vm

    vm = Vm(0x10000, 1, irqchip=False, huge_pages=False)
    try:
        pci = PciRoot(vm)
        dev = Fb()
        pci.add(dev, 3)
        pci.config_write(3, 0, 0x10, 4, FB)
        pci.config_write(3, 0, 0x04, 2, 2)                  # memory decoding on
        ram = dev.ram_bars[0]
        assert ram.slot is not None and ram.gpa == FB
        _real_mode(vm, _store_code(FB >> 4))
        assert ram.view[0x1000] == ram.view[0x3000] == ram.view[0x7000] == 1
        log = ram.dirty_log()
        if dirty_log_works():
            assert log[0] == 0x8A and not any(log[1:])
        pci.config_write(3, 0, 0x04, 2, 0)
        pci.config_write(3, 0, 0x10, 4, 0x80000)
        pci.config_write(3, 0, 0x04, 2, 2)
        ram.view[0x1000] = 0
        _real_mode(vm, _store_code(0x8000))
        assert ram.view[0x1000] == 1 and ram.gpa == 0x80000
        pci.close()
        assert ram.slot is None
    finally:
        vm.close()


@pytest.mark.kvm
def test_dirty_log_probe_answers() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm")
    assert dirty_log_works() in (True, False)
    assert dirty_log_works() is dirty_log_works()          # cached
