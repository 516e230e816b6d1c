"""I/O-port and MMIO buses: resolve a guest access to (device, offset) once, then call it.

A bus device implements the narrow contract below (as in cloud-hypervisor's ``BusDevice``):
``read(offset, size) -> int`` and ``write(offset, size, value)``, where ``offset`` is relative
to the base of the range the device was inserted at and ``size`` is 1, 2, 4 or 8 bytes.
Devices raise nothing into the vCPU loop: a register they do not implement reads as all ones
(ISA convention) and ignores writes.

The port bus is a flat table of 65536 slots, so a PIO exit costs one list index. The MMIO bus
keeps sorted, non-overlapping ranges and bisects, behind a per-page cache of the range's
read/write callables, so an MMIO exit costs one dict lookup and one call.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from typing import Protocol

from vmrun.errors import VmrunError


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class ByteWideDevice:
    """Base for byte-wide ISA devices (UART, i8042): a wider access is split into byte cycles,
    lowest address first, as the ISA bus does. Subclasses implement ``_read_byte`` and
    ``_write_byte``."""

    def _read_byte(self, offset: int) -> int:
        raise NotImplementedError

    def _write_byte(self, offset: int, value: int) -> None:
        raise NotImplementedError

    def read(self, offset: int, size: int) -> int:
        if size == 1:
            return self._read_byte(offset)
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self._write_byte(offset, value & 0xFF)
            return
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)


class BusConflict(VmrunError):
    pass


class Unclaimed:
    """Answers ports nobody claimed: reads all ones, writes are dropped. Counted, and with
    ``on_access`` set (bhyve's -e, ``on_unhandled_io = "exit"``) reported."""

    def __init__(self, bus: PortBus) -> None:
        self.bus = bus
        # on_access(port, size, value or None for a read); may raise to stop the vCPU.
        self.on_access = None

    def read(self, offset: int, size: int) -> int:
        self.bus.unhandled += 1
        if self.on_access is not None:
            self.on_access(offset, size, None)
        return (1 << (size * 8)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.bus.unhandled += 1
        if self.on_access is not None:
            self.on_access(offset, size, value)


class PortBus:
    """The x86 I/O-port space (0..0xFFFF).

    Every slot holds ``(device, base)``; unclaimed ports hold ``(Unclaimed, port)`` so the
    vCPU loop never tests for None (its "offset" is then the port number).
    """

    def __init__(self) -> None:
        self.unhandled = 0  # accesses nobody claimed (for -v and for exit-on-unhandled)
        self.unclaimed = Unclaimed(self)
        self.slots: list[tuple[BusDevice, int]] = [(self.unclaimed, 0)] * 0x10000

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if base < 0 or length <= 0 or base + length > 0x10000:
            raise BusConflict(f"I/O ports {base:#x}+{length:#x} are outside 0..0xffff")
        for port in range(base, base + length):
            other = self.slots[port][0]
            if other is not self.unclaimed:
                raise BusConflict(f"I/O port {port:#x} already belongs to {type(other).__name__}")
        entry = (device, base)
        for port in range(base, base + length):
            self.slots[port] = entry

    def remove(self, base: int, length: int) -> None:
        for port in range(base, base + length):
            self.slots[port] = (self.unclaimed, 0)

    def read(self, port: int, size: int) -> int:
        dev, base = self.slots[port]
        return dev.read(port - base, size)

    def write(self, port: int, size: int, value: int) -> None:
        dev, base = self.slots[port]
        dev.write(port - base, size, value)


PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_CACHE_MAX = 4096  # entries; a full cache starts over (ECAM alone spans 65536 pages)


class MmioBus:
    """Guest-physical MMIO ranges outside RAM.

    Ranges are sorted and non-overlapping; :meth:`resolve` bisects. The vCPU loop does not:
    it looks the guest-physical page up in :attr:`pages`, a cache from page number to
    ``(base, read, write)`` where ``read(offset, size)``/``write(offset, size, value)`` are the
    callables of the range covering the whole page (a device's bound methods, or what its
    ``bus_callables()`` hands out, e.g. a PCI BAR window's device methods with the BAR index
    bound) and ``base`` is what to subtract from the address. Pages no range touches cache
    the unclaimed handlers (``base`` 0, so they see the address), which count in
    :attr:`unhandled` and read as all ones. Pages only partly covered are never cached: they
    take :meth:`lookup`, the bisect, every time.

    Every insert and remove clears the cache (BARs move at runtime) under :attr:`lock`, which
    :meth:`lookup` also holds while it resolves and fills, so no fill can bring back an entry
    of a range that was just removed. The cache dict itself is never replaced: the vCPU loop
    keeps a reference to it.
    """

    def __init__(self) -> None:
        self.bases: list[int] = []
        self.ranges: list[tuple[int, int, BusDevice]] = []  # (base, end, device), sorted
        self.unhandled = 0
        self.lock = threading.Lock()
        # page number -> (base, read, write); cleared on every change of the ranges
        self.pages: dict[int, tuple[int, Callable[[int, int], int],
                                    Callable[[int, int, int], None]]] = {}
        self._callables: dict[int, tuple] = {}  # base -> (base, read, write) of each range
        self._unclaimed = (0, self._unclaimed_read, self._unclaimed_write)

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        end = base + length
        if length <= 0 or base < 0 or end > 1 << 64:
            raise BusConflict(f"MMIO range {base:#x}+{length:#x} is invalid")
        get = getattr(device, "bus_callables", None)
        read, write = get() if get is not None else (device.read, device.write)
        with self.lock:
            i = bisect.bisect_right(self.bases, base)
            if i > 0 and self.ranges[i - 1][1] > base:
                raise BusConflict(f"MMIO {base:#x}+{length:#x} overlaps "
                                  f"{type(self.ranges[i - 1][2]).__name__}")
            if i < len(self.ranges) and self.ranges[i][0] < end:
                raise BusConflict(f"MMIO {base:#x}+{length:#x} overlaps "
                                  f"{type(self.ranges[i][2]).__name__}")
            self.bases.insert(i, base)
            self.ranges.insert(i, (base, end, device))
            self._callables[base] = (base, read, write)
            self.pages.clear()

    def remove(self, base: int) -> None:
        with self.lock:
            i = bisect.bisect_left(self.bases, base)
            if i < len(self.bases) and self.bases[i] == base:
                del self.bases[i]
                del self.ranges[i]
                del self._callables[base]
                self.pages.clear()

    def resolve(self, addr: int) -> tuple[BusDevice, int] | None:
        i = bisect.bisect_right(self.bases, addr) - 1
        if i >= 0:
            base, end, dev = self.ranges[i]
            if addr < end:
                return dev, base
        return None

    def lookup(self, addr: int) -> tuple[int, Callable[[int, int], int],
                                         Callable[[int, int, int], None]]:
        """``(base, read, write)`` for ``addr``, caching it in :attr:`pages` when one range
        (or none) covers the whole page. The vCPU loop's path on a cache miss."""
        page = addr >> PAGE_SHIFT
        lo = page << PAGE_SHIFT
        hi = lo + PAGE_SIZE
        with self.lock:
            bases, ranges = self.bases, self.ranges
            i = bisect.bisect_right(bases, addr) - 1
            if i >= 0 and addr < ranges[i][1]:
                base, end, _ = ranges[i]
                entry = self._callables[base]
                if not (base <= lo and end >= hi):
                    return entry
            else:
                entry = self._unclaimed
                # Unclaimed: cacheable only if no range covers any of the page either.
                if not ((i < 0 or ranges[i][1] <= lo)
                        and (i + 1 >= len(ranges) or ranges[i + 1][0] >= hi)):
                    return entry
            pages = self.pages
            if len(pages) >= PAGE_CACHE_MAX:
                pages.clear()
            pages[page] = entry
            return entry

    def _unclaimed_read(self, addr: int, size: int) -> int:
        self.unhandled += 1
        return (1 << (size * 8)) - 1

    def _unclaimed_write(self, addr: int, size: int, value: int) -> None:
        self.unhandled += 1

    def read(self, addr: int, size: int) -> int:
        entry = self.pages.get(addr >> PAGE_SHIFT) or self.lookup(addr)
        return entry[1](addr - entry[0], size)

    def write(self, addr: int, size: int, value: int) -> None:
        entry = self.pages.get(addr >> PAGE_SHIFT) or self.lookup(addr)
        entry[2](addr - entry[0], size, value)
