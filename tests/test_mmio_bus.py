"""MmioBus: ranges, the per-page cache of (base, read, write) and its invalidation, unhandled
accounting, PCI BAR windows; and a KVM guest doing MMIO loads and stores of 1, 2, 4 and 8 bytes
through the vCPU loop's fast path."""

from __future__ import annotations

import os
import threading

import pytest

from vmrun.core.bus import PAGE_CACHE_MAX, BusConflict, MmioBus
from vmrun.core.exits import ExitCode
from vmrun.core.pci import PciBarWindow
from vmrun.testing import RecordingDevice

BASE = 0xFEB0_0000


class Recorder(RecordingDevice):
    """Reads answer all 8 bytes set, so a wrong mask shows."""

    def __init__(self, value: int = 0x8877_6655_4433_2211) -> None:
        super().__init__(value)


class BarDevice:
    """Just the two methods a PCI BAR window forwards to."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def bar_read(self, index: int, offset: int, size: int) -> int:
        self.log.append(("r", index, offset, size))
        return 0x40 + index

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.log.append(("w", index, offset, size, value))


# -- ranges and resolve --------------------------------------------------------------------
def test_resolve_boundaries() -> None:
    bus = MmioBus()
    a, b = Recorder(), Recorder()
    bus.insert(a, BASE, 0x1000)
    bus.insert(b, BASE + 0x1000, 0x10)
    assert bus.resolve(BASE - 1) is None
    assert bus.resolve(BASE) == (a, BASE)
    assert bus.resolve(BASE + 0xFFF) == (a, BASE)
    assert bus.resolve(BASE + 0x1000) == (b, BASE + 0x1000)
    assert bus.resolve(BASE + 0x100F) == (b, BASE + 0x1000)
    assert bus.resolve(BASE + 0x1010) is None


@pytest.mark.parametrize("base,length", [
    (BASE, 0x1000), (BASE - 0x10, 0x11), (BASE + 0xFFF, 1), (BASE - 0x1000, 0x3000),
])
def test_overlaps_are_refused(base: int, length: int) -> None:
    bus = MmioBus()
    bus.insert(Recorder(), BASE, 0x1000)
    with pytest.raises(BusConflict):
        bus.insert(Recorder(), base, length)
    assert len(bus.ranges) == 1


@pytest.mark.parametrize("base,length", [(0, 0), (-1, 1), ((1 << 64) - 1, 2)])
def test_invalid_ranges_are_refused(base: int, length: int) -> None:
    with pytest.raises(BusConflict):
        MmioBus().insert(Recorder(), base, length)


def test_adjacent_ranges_and_remove_of_unknown_base() -> None:
    bus = MmioBus()
    bus.insert(Recorder(), BASE, 0x1000)
    bus.insert(Recorder(), BASE - 0x1000, 0x1000)
    bus.remove(BASE + 0x10)     # not a base: nothing happens
    assert bus.bases == [BASE - 0x1000, BASE]


# -- dispatch and the page cache -----------------------------------------------------------
def test_read_write_offsets_and_cache_fill() -> None:
    bus = MmioBus()
    dev = Recorder()
    bus.insert(dev, BASE, 0x2000)
    bus.write(BASE + 0x1234, 4, 0xDEADBEEF)
    assert bus.read(BASE + 8, 2) == dev.value   # the bus does not mask; the vCPU loop does
    assert dev.writes == [(0x1234, 4, 0xDEADBEEF)]
    assert dev.reads == [(8, 2)]
    assert set(bus.pages) == {(BASE + 0x1000) >> 12, BASE >> 12}
    assert bus.lookup(BASE + 4) == (BASE, dev.read, dev.write)
    assert bus.unhandled == 0


def test_remove_invalidates_cache() -> None:
    bus = MmioBus()
    dev = Recorder()
    bus.insert(dev, BASE, 0x1000)
    bus.write(BASE, 4, 1)
    assert bus.pages
    bus.remove(BASE)
    assert not bus.pages
    assert bus.read(BASE, 4) == 0xFFFFFFFF
    bus.write(BASE, 4, 2)
    assert bus.unhandled == 2
    assert dev.writes == [(0, 4, 1)]


def test_reinsert_same_address_reaches_new_device() -> None:
    bus = MmioBus()
    old, new = Recorder(1), Recorder(2)
    bus.insert(old, BASE, 0x1000)
    assert bus.read(BASE + 4, 4) == 1
    bus.remove(BASE)
    assert bus.read(BASE + 4, 4) == 0xFFFFFFFF   # caches the page as unclaimed
    bus.insert(new, BASE, 0x1000)
    assert bus.read(BASE + 4, 4) == 2
    bus.write(BASE + 4, 1, 7)
    assert new.writes == [(4, 1, 7)] and old.writes == []
    assert bus.unhandled == 1


def test_reinsert_overlapping_address_uses_new_base() -> None:
    """A BAR moved so that its new range overlaps the old one: offsets follow the new base."""
    bus = MmioBus()
    old, new = Recorder(1), Recorder(2)
    bus.insert(old, BASE, 0x4000)
    for page in range(4):
        bus.read(BASE + page * 0x1000, 4)
    bus.remove(BASE)
    bus.insert(new, BASE + 0x2000, 0x4000)
    assert bus.read(BASE + 0x1000, 4) == 0xFFFFFFFF
    assert bus.read(BASE + 0x2010, 4) == 2
    bus.write(BASE + 0x3008, 8, 9)
    assert new.reads == [(0x10, 4)]
    assert new.writes == [(0x1008, 8, 9)]
    assert bus.unhandled == 1


def test_insert_into_unclaimed_cached_page_invalidates() -> None:
    bus = MmioBus()
    assert bus.read(BASE + 0x800, 1) == 0xFF
    assert bus.pages[BASE >> 12] == bus._unclaimed
    dev = Recorder(5)
    bus.insert(dev, BASE + 0x800, 0x10)     # a small range inside that page
    assert bus.read(BASE + 0x800, 1) == 5
    assert bus.read(BASE + 0x7FF, 1) == 0xFF
    assert bus.read(BASE + 0x810, 1) == 0xFF
    assert BASE >> 12 not in bus.pages      # partly covered: never cached
    assert bus.unhandled == 3


def test_partly_covered_pages_are_not_cached() -> None:
    bus = MmioBus()
    a, b = Recorder(1), Recorder(2)
    bus.insert(a, BASE + 0x100, 0x100)
    bus.insert(b, BASE + 0x1F00, 0x200)     # straddles a page boundary
    assert bus.read(BASE + 0x100, 4) == 1
    assert bus.read(BASE + 0x1F00, 4) == 2
    assert bus.read(BASE + 0x2000, 4) == 2
    assert bus.read(BASE + 0x2100, 4) == 0xFFFFFFFF
    assert bus.read(BASE + 0x0, 4) == 0xFFFFFFFF
    assert bus.pages == {}
    assert b.reads == [(0, 4), (0x100, 4)]
    assert bus.unhandled == 2
    assert bus.read(BASE + 0x3000, 4) == 0xFFFFFFFF     # untouched page: cached as unclaimed
    assert list(bus.pages) == [(BASE + 0x3000) >> 12]


def test_unhandled_accounting_through_the_cache() -> None:
    bus = MmioBus()
    bus.insert(Recorder(), BASE, 0x1000)
    for size in (1, 2, 4, 8):
        assert bus.read(0xD0000 + size, size) == (1 << (8 * size)) - 1
        bus.write(0xD0000 + size, size, 0)
    assert bus.unhandled == 8
    assert bus.pages[0xD0] == bus._unclaimed


def test_cache_is_bounded() -> None:
    bus = MmioBus()
    dev = Recorder()
    bus.insert(dev, 0xE000_0000, 0x1000_0000)   # an ECAM-sized range
    for page in range(PAGE_CACHE_MAX + 10):
        bus.read(0xE000_0000 + (page << 12), 4)
    assert 0 < len(bus.pages) <= PAGE_CACHE_MAX
    assert len(dev.reads) == PAGE_CACHE_MAX + 10


def test_pci_bar_window_binds_bar_index() -> None:
    bus = MmioBus()
    dev = BarDevice()
    bus.insert(PciBarWindow(dev, 2), BASE, 0x1000)
    bus.insert(PciBarWindow(dev, 4), BASE + 0x1000, 0x1000)
    assert bus.read(BASE + 0x10, 4) == 0x42
    assert bus.read(BASE + 0x1010, 2) == 0x44
    bus.write(BASE + 0x1FFC, 4, 0xAB)
    assert dev.log == [("r", 2, 0x10, 4), ("r", 4, 0x10, 2), ("w", 4, 0xFFC, 4, 0xAB)]
    window = PciBarWindow(dev, 1)
    assert window.read(8, 4) == 0x41      # the window's own methods still work
    window.write(8, 1, 3)
    assert dev.log[-2:] == [("r", 1, 8, 4), ("w", 1, 8, 1, 3)]


def test_remove_under_concurrent_access_leaves_no_stale_entry() -> None:
    """A vCPU thread missing the cache while another thread moves the range must not put the
    removed range's entry back."""
    bus = MmioBus()
    devs = [Recorder(0), Recorder(1)]
    bus.insert(devs[0], BASE, 0x1000)
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            bus.read(BASE + 4, 4)
            bus.read(BASE + 0x1004, 4)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        where = 0
        for i in range(2000):
            bus.remove(BASE + where)
            where = 0x1000 - where
            bus.insert(devs[(i + 1) % 2], BASE + where, 0x1000)
    finally:
        stop.set()
        t.join()
    # After an even number of moves devs[0] is back at BASE; BASE + 0x1000 is unclaimed.
    for page, (base, read, _) in bus.pages.items():
        hit = bus.resolve(page << 12)
        assert (hit is None and base == 0) or \
            (hit is not None and (base, read) == (hit[1], hit[0].read))
    assert bus.resolve(BASE + 4) == (devs[0], BASE)
    assert bus.read(BASE + 4, 4) == 0
    assert bus.read(BASE + 0x1004, 4) == 0xFFFFFFFF


# -- through KVM -------------------------------------------------------------------------
kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")

MMIO = 0x4000_0000          # below 2 GiB: a disp32 that does not sign-extend
UNCLAIMED = 0x5000_0000
ECHO = 0x800                # the guest stores what it loaded here, as 8 bytes
STORE_VALUE = 0x1122_3344_5566_7788
# mov [disp32], al/ax/eax/rax and mov al/ax/eax/rax, [disp32] (ModRM 04, SIB 25)
STORE = {1: b"\x88\x04\x25", 2: b"\x66\x89\x04\x25", 4: b"\x89\x04\x25", 8: b"\x48\x89\x04\x25"}
LOAD = {1: b"\x8a\x04\x25", 2: b"\x66\x8b\x04\x25", 4: b"\x8b\x04\x25", 8: b"\x48\x8b\x04\x25"}
XOR_EAX = b"\x31\xc0"       # clears all of rax


def _d32(addr: int) -> bytes:
    return addr.to_bytes(4, "little")


def _mov_rax(imm: int) -> bytes:
    return b"\x48\xb8" + imm.to_bytes(8, "little")


def _run(vm, timeout: float = 20.0):
    try:
        vm.start()
        info = vm.wait(timeout)
        assert info is not None, "guest did not finish"
        return info
    finally:
        vm.close()


@pytest.mark.kvm
@kvm
def test_guest_mmio_sizes_1_2_4_8() -> None:
    from vmrun.testing import guests as g

    code = b""
    for size in (1, 2, 4, 8):
        off = size * 0x10
        code += _mov_rax(STORE_VALUE) + STORE[size] + _d32(MMIO + off)
        code += XOR_EAX + LOAD[size] + _d32(MMIO + off + 8) + STORE[8] + _d32(MMIO + ECHO)
    for size in (1, 2, 4, 8):
        code += XOR_EAX + LOAD[size] + _d32(UNCLAIMED + size) + STORE[8] + _d32(MMIO + ECHO)
    code += _mov_rax(STORE_VALUE) + STORE[4] + _d32(UNCLAIMED)
    code += g.HLT
    vm = g.long_mode_vm(code)
    dev = Recorder()
    vm.mmio.insert(dev, MMIO, 0x1000)
    info = _run(vm)
    assert info.code == ExitCode.HALT, info.reason
    assert dev.reads == [(s * 0x10 + 8, s) for s in (1, 2, 4, 8)]
    stores = [w for w in dev.writes if w[0] != ECHO]
    echoes = [w[2] for w in dev.writes if w[0] == ECHO]
    assert stores == [(s * 0x10, s, STORE_VALUE & ((1 << (8 * s)) - 1)) for s in (1, 2, 4, 8)]
    assert echoes == ([dev.value & ((1 << (8 * s)) - 1) for s in (1, 2, 4, 8)]
                      + [(1 << (8 * s)) - 1 for s in (1, 2, 4, 8)])
    assert vm.mmio.unhandled == 5


class Mover(Recorder):
    """A register block that moves itself (as a BAR re-programmed by the guest) on a write to
    offset 0: the range is removed and ``then`` inserted at the same base."""

    def __init__(self, bus: MmioBus, base: int, then: Recorder) -> None:
        super().__init__(value=0xAA)
        self.bus, self.base, self.then = bus, base, then

    def write(self, offset: int, size: int, value: int) -> None:
        super().write(offset, size, value)
        if offset == 0:
            self.bus.remove(self.base)
            self.bus.insert(self.then, self.base, 0x1000)


@pytest.mark.kvm
@kvm
def test_guest_sees_range_moved_while_running() -> None:
    """The vCPU loop's cache is the bus's: a range replaced by a device handler mid-run is
    seen by the very next exit."""
    from vmrun.testing import guests as g

    code = (XOR_EAX + LOAD[1] + _d32(MMIO + 4) + STORE[8] + _d32(MMIO + ECHO)   # old device
            + STORE[1] + _d32(MMIO)                                             # move
            + XOR_EAX + LOAD[1] + _d32(MMIO + 4) + STORE[8] + _d32(MMIO + ECHO)  # new device
            + g.HLT)
    vm = g.long_mode_vm(code)
    new = Recorder(value=0x55)
    old = Mover(vm.mmio, MMIO, new)
    vm.mmio.insert(old, MMIO, 0x1000)
    info = _run(vm)
    assert info.code == ExitCode.HALT, info.reason
    assert old.reads == [(4, 1)] and new.reads == [(4, 1)]
    assert old.writes == [(ECHO, 8, 0xAA), (0, 1, 0xAA)]
    assert new.writes == [(ECHO, 8, 0x55)]
    assert vm.mmio.unhandled == 0
