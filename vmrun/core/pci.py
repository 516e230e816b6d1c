"""PCI: configuration space, BARs, capabilities, the root bus and its access mechanisms.

The device contract (what a plugin's factory returns) is :class:`PciDevice`. The core does the
generic parts for it — the type-0 header, BAR sizing and decoding, the capability list,
INTx routing — so a device only answers ``bar_read``/``bar_write`` for its own registers and,
if it wants, ``config_read``/``config_write`` for device-specific configuration registers.

Guest access paths: mechanism #1 (0xCF8 address, 0xCFC..0xCFF data) and ECAM (MMIO). A BAR is
put on the port or MMIO bus when the guest enables I/O or memory decoding and has placed it; it
is moved when the guest re-programs it; from then on an access to it costs one bus lookup and
one :meth:`PciDevice.bar_read`/:meth:`bar_write` call through a small adapter.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from vmrun.core import layout
from vmrun.core.dma import GuestDma
from vmrun.core.interrupts import InterruptSource
from vmrun.core.msi import CAP_ID_MSI
from vmrun.core.msix import CAP_ID_MSIX
from vmrun.errors import VmrunError

if TYPE_CHECKING:
    from vmrun.core.eventloop import EventLoop, Source
    from vmrun.core.vm import Vm

log = logging.getLogger("vmrun.pci")

# Header offsets (PCI Local Bus spec 3.0, type 0).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4

CAP_ID_VENDOR = 0x09
__all__ = ["CAP_ID_MSI", "CAP_ID_MSIX", "CAP_ID_VENDOR", "PciDevice", "BarSpec", "RamBar"]

BAR_IO = "io"
BAR_MEM32 = "mem32"
BAR_MEM64 = "mem64"


@dataclass
class BarSpec:
    """A BAR the device wants: its index, size (power of two) and kind.

    ``ram = True`` (memory BARs only): the BAR is host memory, not registers — the core
    allocates a :class:`RamBar` (``dev.ram_bars[index]``) and, while the guest decodes the
    BAR, maps it into the guest as a KVM memory slot (with the dirty page log), so guest
    accesses never exit (a framebuffer).
    """

    index: int
    size: int
    kind: str = BAR_MEM32
    prefetchable: bool = False
    ram: bool = False

    def __post_init__(self) -> None:
        if self.size & (self.size - 1) or self.size < (4 if self.kind == BAR_IO else 16):
            raise ValueError(f"BAR{self.index}: size {self.size:#x} is not a power of two")
        if self.ram and (self.kind == BAR_IO or self.size < mmap.PAGESIZE):
            raise ValueError(f"BAR{self.index}: a RAM BAR is memory, at least a page")


class RamBar:
    """The host memory behind a RAM-backed BAR (zeroed, shared anonymous mapping).

    The device reads and writes it through :attr:`view`. While the BAR is decoded the core
    keeps it mapped into the guest at :attr:`gpa` as KVM memory slot :attr:`slot`, with the
    dirty page log on; :meth:`dirty_log` hands out what the guest wrote since the last call.
    :attr:`generation` changes on every (re)mapping: a log from before tells nothing then.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.mm = mmap.mmap(-1, size)
        self.view = memoryview(self.mm)
        from vmrun.core.kvm import ffi

        self.hva = int(ffi.cast("uintptr_t", ffi.from_buffer(self.mm)))
        self.gpa: int | None = None
        self.slot: int | None = None
        self.generation = 0
        self._vm: Vm | None = None

    def map(self, vm: Vm, gpa: int) -> None:
        """Map into the guest (a memory slot where the VM has them; otherwise accesses exit
        and reach the buffer through :class:`RamBarWindow`)."""
        if hasattr(vm, "add_memslot"):
            from vmrun.core.kvm import KvmError

            try:
                self.slot = vm.add_memslot(gpa, self.size, self.hva, log_dirty=True)
            except KvmError as e:   # overlaps guest RAM or another slot: not decoded
                raise VmrunError(f"RAM BAR at {gpa:#x}: {e}") from None
            self._vm = vm
        self.gpa = gpa
        self.generation += 1

    def unmap(self) -> None:
        if self.slot is not None and self._vm is not None:
            self._vm.remove_memslot(self.slot)
        self.slot = None
        self._vm = None
        self.gpa = None
        self.generation += 1

    def dirty_log(self) -> bytes | None:
        """One bit per 4 KiB page the guest wrote since the last call (KVM_GET_DIRTY_LOG), or
        None while there is no log (not mapped, or no memory slot)."""
        if self.slot is None or self._vm is None:
            return None
        return self._vm.get_dirty_log(self.slot, self.size)

    def close(self) -> None:
        if self.slot is not None:
            try:
                self.unmap()
            except OSError:
                pass
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass   # a device still holds a view: the mapping goes when it is collected


class RamBarWindow:
    """The bus side of a RAM BAR: only reached when an access does exit (no memory slot, or
    a test without KVM); reads and writes the buffer little-endian."""

    __slots__ = ("ram",)

    def __init__(self, ram: RamBar) -> None:
        self.ram = ram

    def read(self, offset: int, size: int) -> int:
        if offset + size > self.ram.size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.ram.view[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset + size <= self.ram.size:
            self.ram.view[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
                size, "little")


class PciDevice:
    """The PCI device contract. Subclass it (device plugins do) and fill in the identity.

    Class attributes/constructor values a device sets: ``vendor_id``, ``device_id``,
    ``class_code`` (24-bit: class, subclass, prog-if), ``revision``, ``subsystem_vendor_id``,
    ``subsystem_id``, ``bars`` (list of :class:`BarSpec`), ``interrupt_pin`` (0 none, 1 INTA#).

    The core calls, from vCPU threads:
      - ``bar_read(index, offset, size) -> int`` / ``bar_write(index, offset, size, value)``:
        a guest access inside BAR ``index`` (offset relative to the BAR's start);
      - ``config_read(offset, size) -> int | None`` / ``config_write(offset, size, value) -> bool``
        for device-specific config registers (return None/False to let the core's generic
        config space answer);
      - ``bar_moved(index, old, new)``: the guest (re)placed a BAR (e.g. to re-register
        ioeventfds); ``old``/``new`` are guest addresses or None when decoding is off;
      - ``reset()``: bring the device to its power-on state (machine reset, FLR).

    Interrupts: declare ``msix_vectors`` (and the free BAR index ``msix_bar`` the core puts
    the table and PBA in) and/or ``msi_vectors``; the core builds ``self.irq``, an
    :class:`~vmrun.core.interrupts.InterruptSource` that owns the capabilities, routes,
    irqfds, masking and reset. The device calls ``self.irq.trigger(vector)`` (MSI-X if the
    driver enabled it, else MSI, else INTA#) and ``self.irq.deassert()`` when the driver
    acknowledges an INTx. A device without vectors drives INTA# with :meth:`set_intx`.

    Doorbells: :meth:`add_doorbell` in :meth:`realize` turns guest writes to a register into
    an ioeventfd served on the event loop (the vCPU does not wait for the device); the core
    re-registers it when the guest moves the BAR.

    The core gives the device, before the guest runs: ``self.config`` (its
    :class:`ConfigSpace`), ``self.irq`` (or None), ``self.intx`` (an IrqLine for INTA#, or
    None), ``self.dma`` (a :class:`~vmrun.core.dma.GuestDma`: guest memory, refused while bus
    mastering is off), ``self.loop`` (the devices' :class:`~vmrun.core.eventloop.EventLoop`),
    ``self.vm`` and ``self.address`` (bus, slot, function), and ``self.ram_bars`` (index ->
    :class:`RamBar`) for its RAM-backed BARs.
    """

    vendor_id = 0xFFFF
    device_id = 0xFFFF
    class_code = 0x000000
    revision = 0
    subsystem_vendor_id = 0
    subsystem_id = 0
    interrupt_pin = 0
    bars: list[BarSpec] = []
    name = "pci-device"

    msix_vectors = 0
    msix_bar: int | None = None
    msi_vectors = 0
    #: Where the capability list starts in config space: a device with registers of its own
    #: at fixed offsets after the header (xHCI's SBRN/FLADJ at 0x60) moves it past them.
    capabilities_offset = 0x40

    config: ConfigSpace
    intx = None
    irq: InterruptSource | None = None
    dma: GuestDma
    loop: EventLoop | None = None
    vm: Vm | None = None
    address: tuple[int, int, int] = (0, 0, 0)
    ram_bars: dict[int, RamBar] = {}
    _doorbells: list[Doorbell]

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def config_read(self, offset: int, size: int) -> int | None:
        return None

    def config_write(self, offset: int, size: int, value: int) -> bool:
        return False

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        pass

    def config_changed(self, offset: int, size: int) -> None:
        """Called after the core applied a guest write to generic config space (e.g. the
        MSI-X capability's enable bits, or the command register)."""
        if offset <= COMMAND + 1 and offset + size > COMMAND:
            self.set_intx(bool(self.config.status & STATUS_INTERRUPT))
        if self.irq is not None:
            self.irq.config_changed(offset, size)

    def set_intx(self, level: bool) -> None:
        """Drive INTA#: the status bit always follows, the pin only when not disabled."""
        self.config.set_interrupt_status(level)
        if self.intx is not None:
            self.intx.set_level(level and not self.config.command & COMMAND_INTX_DISABLE)

    def add_doorbell(self, bar: int, offset: int, length: int,
                     callback: Callable[[], object], datamatch: int | None = None) -> None:
        """Guest writes of ``length`` bytes at ``offset`` in BAR ``bar`` (matching
        ``datamatch`` if given) run ``callback()`` on the event loop instead of a
        :meth:`bar_write` on the vCPU thread. Without KVM (tests) nothing is registered and
        the write arrives as a :meth:`bar_write`, as an odd-sized write would."""
        if self.vm is None or self.loop is None or not hasattr(self.vm, "register_ioeventfd"):
            return
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

        def ring(_fd: int) -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            callback()

        bell = Doorbell(bar, offset, length, datamatch, fd)
        bell.source = self.loop.add(fd, ring, self)
        self.__dict__.setdefault("_doorbells", []).append(bell)
        addr = self.config.bar_address(bar) if self.config.command & COMMAND_MEMORY else 0
        if addr:
            bell.register(self, addr)

    def _move_doorbells(self, index: int, new: int | None) -> None:
        for bell in self.__dict__.get("_doorbells", ()):
            if bell.bar == index:
                bell.unregister(self)
                if new is not None:
                    bell.register(self, new)

    def _close_doorbells(self) -> None:
        for bell in self.__dict__.pop("_doorbells", ()):
            bell.unregister(self)
            bell.source.remove()
            os.close(bell.fd)

    def fault(self, reason: str) -> None:
        """One of this device's event-loop callbacks raised: by default it stops serving its
        doorbells (one log line) until the machine resets it (:meth:`recover`); a virtio
        transport overrides this with DEVICE_NEEDS_RESET, which a driver reset clears."""
        log.error("%s: %s: device stopped", self.name, reason)
        for bell in self.__dict__.get("_doorbells", ()):
            bell.source.disable()

    def recover(self) -> None:
        """Serve the doorbells again after a :meth:`fault` (the core calls it on reset; a
        device with a reset register of its own may call it too)."""
        for bell in self.__dict__.get("_doorbells", ()):
            bell.source.enable()

    def realize(self) -> None:
        """Called once the device is placed (config/intx/vm set), before the guest runs."""

    # -- snapshots (vmrun.core.devstate) -------------------------------------------------
    def save_state(self) -> dict:
        """The function's config space, its MSI/MSI-X state and :meth:`device_state`."""
        from vmrun.core.devstate import encode

        return {"config": encode(bytes(self.config.data)), "device": self.device_state(),
                "irq": self.irq.save_state() if self.irq is not None else {}}

    def load_state(self, state: dict) -> None:
        """Config space back (the root then re-decodes the BARs), then the device's own,
        once it has the shape of what this device saves (a snapshot file is input)."""
        from vmrun.core.devstate import SnapshotUnsupported, check_like, decode

        config = decode(state["config"])
        if not isinstance(config, bytes) or len(config) != len(self.config.data):
            raise ValueError(f"{self.name}: config space of {len(config)} bytes saved, the "
                             f"function has {len(self.config.data)}"
                             if isinstance(config, bytes) else
                             f"{self.name}: config space saved as {type(config).__name__}")
        device = state["device"]
        try:
            template = self.device_state()      # the shape this device, fresh, saves
        except SnapshotUnsupported:
            template = None                     # load_device_state says so
        if template is not None and device:
            check_like(self.name, template, device)
        self.config.data[:] = config
        if self.irq is not None:
            self.irq.load_state(state.get("irq", {}))
        self.load_device_state(device)

    def device_state(self) -> dict:
        """The device's own guest-visible state (registers, queues), plain data, with the
        vCPUs paused and the event loop held (see :mod:`vmrun.plugins.hookspecs`). The
        default: none it could save, so the snapshot is refused naming the device. A device
        without state of its own returns ``{}``; one with plain register attributes can
        return ``vmrun.core.devstate.save_fields(self, exclude)``, one with its own shape
        ``versioned(version, fields)``. Its RAM BARs are saved by the snapshot itself."""
        from vmrun.core.devstate import SnapshotUnsupported

        raise SnapshotUnsupported(f"{self.name}: this device cannot be snapshotted yet")

    def load_device_state(self, state: dict) -> None:
        from vmrun.core.devstate import SnapshotUnsupported

        if state:
            raise SnapshotUnsupported(f"{self.name}: this device cannot be restored")

    def reset(self) -> None:
        pass

    def close(self) -> None:
        """Release host resources (threads, files)."""


@dataclass
class Doorbell:
    """One ioeventfd a device asked for, and where it is registered now."""

    bar: int
    offset: int
    length: int
    datamatch: int | None
    fd: int
    source: Source | None = None
    at: int | None = None

    def register(self, dev: PciDevice, bar_address: int) -> None:
        assert dev.vm is not None
        self.at = bar_address + self.offset
        dev.vm.register_ioeventfd(self.fd, self.at, self.length, datamatch=self.datamatch)

    def unregister(self, dev: PciDevice) -> None:
        if self.at is not None and dev.vm is not None:
            dev.vm.register_ioeventfd(self.fd, self.at, self.length, datamatch=self.datamatch,
                                      deassign=True)
        self.at = None


class ConfigSpace:
    """256 bytes of type-0 configuration space with per-byte write masks and BAR semantics."""

    def __init__(self, dev: PciDevice) -> None:
        self.data = bytearray(256)
        self.wmask = bytearray(256)
        self.w1c = bytearray(256)      # write-1-to-clear bits (status register)
        self.bars: dict[int, BarSpec] = {b.index: b for b in dev.bars}
        struct.pack_into("<HH", self.data, VENDOR_ID, dev.vendor_id, dev.device_id)
        self.data[REVISION_ID] = dev.revision
        self.data[CLASS_PROG:CLASS_PROG + 3] = dev.class_code.to_bytes(3, "little")
        struct.pack_into("<HH", self.data, SUBSYSTEM_VENDOR_ID, dev.subsystem_vendor_id,
                         dev.subsystem_id)
        self.data[INTERRUPT_PIN] = dev.interrupt_pin
        self.wmask[INTERRUPT_LINE] = 0xFF
        # Command: I/O, memory, bus master, INTx disable are writable.
        struct.pack_into("<H", self.wmask, COMMAND, COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER
                         | COMMAND_INTX_DISABLE)
        self.next_cap = dev.capabilities_offset
        self.last_cap_ptr = CAPABILITIES_POINTER
        for bar in dev.bars:
            off = BAR0 + 4 * bar.index
            if bar.kind == BAR_IO:
                self.data[off] = 0x1
                struct.pack_into("<I", self.wmask, off, ~(bar.size - 1) & 0xFFFFFFFC)
            else:
                low = (0x4 if bar.kind == BAR_MEM64 else 0) | (0x8 if bar.prefetchable else 0)
                self.data[off] = low
                struct.pack_into("<I", self.wmask, off, ~(bar.size - 1) & 0xFFFFFFF0)
                if bar.kind == BAR_MEM64:
                    struct.pack_into("<I", self.wmask, off + 4, ((~(bar.size - 1)) >> 32)
                                     & 0xFFFFFFFF)

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (``body`` excludes the 2-byte id/next header); returns its offset.
        ``writable`` is a write mask for ``body``."""
        off = self.next_cap
        length = 2 + len(body)
        if off + length > 256:
            raise ValueError("PCI capability list does not fit in config space")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[off + 2:off + length] = body
        if writable is not None:
            self.wmask[off + 2:off + length] = writable
        self.data[self.last_cap_ptr] = off
        self.last_cap_ptr = off + 1
        struct.pack_into("<H", self.data, STATUS, self.status | STATUS_CAP_LIST)
        self.next_cap = (off + length + 3) & ~3
        return off

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.data, COMMAND)[0]

    @property
    def status(self) -> int:
        return struct.unpack_from("<H", self.data, STATUS)[0]

    def set_interrupt_status(self, on: bool) -> None:
        st = self.status
        st = (st | STATUS_INTERRUPT) if on else (st & ~STATUS_INTERRUPT)
        struct.pack_into("<H", self.data, STATUS, st)

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        off = BAR0 + 4 * index
        low = struct.unpack_from("<I", self.data, off)[0]
        if bar.kind == BAR_IO:
            return low & 0xFFFFFFFC
        addr = low & 0xFFFFFFF0
        if bar.kind == BAR_MEM64:
            addr |= struct.unpack_from("<I", self.data, off + 4)[0] << 32
        return addr

    def set_bar_address(self, index: int, addr: int) -> None:
        bar = self.bars[index]
        off = BAR0 + 4 * index
        low = struct.unpack_from("<I", self.data, off)[0]
        keep = 0x3 if bar.kind == BAR_IO else 0xF
        struct.pack_into("<I", self.data, off, (addr & ~keep & 0xFFFFFFFF) | (low & keep))
        if bar.kind == BAR_MEM64:
            struct.pack_into("<I", self.data, off + 4, addr >> 32)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            o = offset + i
            if o >= 256:
                break
            b = (value >> (8 * i)) & 0xFF
            m = self.wmask[o]
            c = self.w1c[o]
            self.data[o] = (self.data[o] & ~m & ~(b & c)) | (b & m)


class PciBarWindow:
    """The bus device that forwards accesses inside one BAR to the PCI device."""

    __slots__ = ("dev", "index")

    def __init__(self, dev: PciDevice, index: int) -> None:
        self.dev = dev
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.dev.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.dev.bar_write(self.index, offset, size, value)

    def bus_callables(self) -> tuple[Callable[[int, int], int], Callable[[int, int, int], None]]:
        """What the MMIO bus calls instead of :meth:`read`/:meth:`write`: the device's own
        ``bar_read``/``bar_write`` with the BAR index bound (``functools.partial`` calls them
        from C, one Python frame fewer than this window; measured faster than a closure)."""
        return partial(self.dev.bar_read, self.index), partial(self.dev.bar_write, self.index)


class PciRoot:
    """Bus 0: slots 0..31 × functions 0..7, config mechanisms, BAR placement and decoding."""

    def __init__(self, vm: Vm, loop: EventLoop | None = None) -> None:
        self.vm = vm
        self.loop = loop
        self.devices: dict[tuple[int, int], PciDevice] = {}
        self.address_reg = 0
        self.mapped: dict[tuple[int, int, int], tuple[str, int, int]] = {}  # (slot,fn,bar)
        self.lock = threading.Lock()
        self.next_io = 0xC000
        self.next_mem32 = layout.PCI_MMIO32_START
        self.next_mem64 = 0  # set by the machine: right above high RAM
        self.next_mem64_base = 0

    # -- placement ------------------------------------------------------------------
    def add(self, dev: PciDevice, slot: int, func: int = 0) -> None:
        if (slot, func) in self.devices:
            raise VmrunError(f"PCI slot {slot}:{func} is taken by "
                             f"{self.devices[(slot, func)].name}")
        if dev.msix_vectors or dev.msi_vectors:
            dev.irq = InterruptSource(dev, dev.msix_vectors, dev.msix_bar, dev.msi_vectors)
            if dev.irq.msix is not None:
                assert dev.msix_bar is not None
                if any(b.index == dev.msix_bar for b in dev.bars):
                    raise VmrunError(f"{dev.name}: BAR{dev.msix_bar} is both the device's and "
                                     "the MSI-X table's")
                dev.bars = [*dev.bars, BarSpec(dev.msix_bar, dev.irq.bar_size, BAR_MEM32)]
        dev.config = ConfigSpace(dev)
        dev.ram_bars = {b.index: RamBar(b.size) for b in dev.bars if b.ram}
        dev.address = (0, slot, func)
        dev.vm = self.vm
        dev.loop = self.loop
        mem = self.vm.memory
        config = dev.config
        dev.dma = GuestDma(mem, gate=config.data, byte=COMMAND, bit=COMMAND_MASTER)
        if dev.irq is not None:
            dev.irq.add_capabilities()
        self.devices[(slot, func)] = dev
        if dev.interrupt_pin:
            gsi = intx_gsi(slot, dev.interrupt_pin)
            dev.config.data[INTERRUPT_LINE] = gsi
            dev.intx = self.vm.irq_line(gsi, level_triggered=True)
        # Function 0 says "multi-function" when any other function of its slot exists.
        if (slot, 0) in self.devices and any(s == slot and f for s, f in self.devices):
            self.devices[(slot, 0)].config.data[HEADER_TYPE] |= 0x80

    def assign_bars(self) -> None:
        """Place every BAR as firmware would and enable decoding (bhyve does the same)."""
        for (slot, func), dev in sorted(self.devices.items()):
            cmd = 0
            for bar in sorted(dev.bars, key=lambda b: -b.size):
                if bar.kind == BAR_IO:
                    addr = _align(self.next_io, bar.size)
                    self.next_io = addr + bar.size
                    cmd |= COMMAND_IO
                elif bar.kind == BAR_MEM64 and self.next_mem64:
                    addr = _align(self.next_mem64, bar.size)
                    self.next_mem64 = addr + bar.size
                    cmd |= COMMAND_MEMORY
                else:
                    addr = _align(self.next_mem32, bar.size)
                    self.next_mem32 = addr + bar.size
                    if self.next_mem32 > layout.ECAM_BASE:
                        raise VmrunError("PCI devices need more 32-bit MMIO space than the "
                                         "machine has")
                    cmd |= COMMAND_MEMORY
                dev.config.set_bar_address(bar.index, addr)
            if cmd:
                cmd |= COMMAND_MASTER
                struct.pack_into("<H", dev.config.data, COMMAND, cmd)
            self._update_mappings(slot, func, dev)
        for dev in self.devices.values():
            if dev.irq is not None:
                dev.irq.realize()
            dev.realize()

    # -- config access ----------------------------------------------------------------
    def config_read(self, slot: int, func: int, offset: int, size: int) -> int:
        dev = self.devices.get((slot, func))
        if dev is None:
            return (1 << (8 * size)) - 1
        if offset >= 256:
            return 0
        value = dev.config_read(offset, size)
        if value is None:
            value = dev.config.read(offset, size)
        return value

    def config_write(self, slot: int, func: int, offset: int, size: int, value: int) -> None:
        dev = self.devices.get((slot, func))
        if dev is None or offset >= 256:
            return
        if dev.config_write(offset, size, value):
            return
        with self.lock:
            dev.config.write(offset, size, value)
            if offset < BAR0 + 24 and offset + size > COMMAND:
                self._update_mappings(slot, func, dev)
        dev.config_changed(offset, size)

    # -- BAR decoding ---------------------------------------------------------------
    def _update_mappings(self, slot: int, func: int, dev: PciDevice) -> None:
        cmd = dev.config.command
        for bar in dev.bars:
            key = (slot, func, bar.index)
            enabled = bool(cmd & (COMMAND_IO if bar.kind == BAR_IO else COMMAND_MEMORY))
            addr = dev.config.bar_address(bar.index)
            limit = 0x10000 if bar.kind == BAR_IO else 1 << 64
            want = None
            if enabled and addr != 0 and addr + bar.size <= limit and \
                    not (bar.kind == BAR_IO and addr < 0x1000):
                want = (bar.kind, addr, bar.size)
            have = self.mapped.get(key)
            if have == want:
                continue
            ram = dev.ram_bars.get(bar.index)
            if have is not None:
                self._unmap(have)
                del self.mapped[key]
                if ram is not None:
                    ram.unmap()
            if want is not None:
                window = dev.irq.window() if dev.irq is not None and \
                    dev.irq.msix is not None and bar.index == dev.msix_bar else None
                if ram is not None:
                    window = RamBarWindow(ram)
                try:
                    self._map(want, window or PciBarWindow(dev, bar.index))
                    try:
                        if ram is not None:
                            ram.map(self.vm, want[1])
                    except VmrunError:
                        self._unmap(want)
                        raise
                    self.mapped[key] = want
                except VmrunError:
                    want = None   # overlaps something: the guest placed it badly; not decoded
            dev._move_doorbells(bar.index, want[1] if want else None)
            dev.bar_moved(bar.index, have[1] if have else None, want[1] if want else None)

    def _map(self, m: tuple[str, int, int], window: PciBarWindow) -> None:
        kind, addr, size = m
        if kind == BAR_IO:
            self.vm.pio.insert(window, addr, size)
        else:
            self.vm.mmio.insert(window, addr, size)

    def _unmap(self, m: tuple[str, int, int]) -> None:
        kind, addr, size = m
        if kind == BAR_IO:
            self.vm.pio.remove(addr, size)
        else:
            self.vm.mmio.remove(addr)

    def save_state(self) -> dict:
        return {f"{slot}:{func}": dev.save_state()
                for (slot, func), dev in sorted(self.devices.items())}

    def load_state(self, state: dict) -> None:
        """Every function's state (the same functions in the same slots), then the BAR
        decoding its restored config space asks for."""
        have = {f"{s}:{f}" for s, f in self.devices}
        if set(state) != have:
            raise ValueError(f"PCI functions {sorted(state)} saved, the machine has "
                             f"{sorted(have)}")
        for (slot, func), dev in sorted(self.devices.items()):
            dev.load_state(state[f"{slot}:{func}"])
            self._update_mappings(slot, func, dev)

    def reset(self) -> None:
        for dev in self.devices.values():
            if dev.irq is not None:
                dev.irq.reset()
            dev.reset()
            dev.recover()

    def close(self) -> None:
        for dev in self.devices.values():
            dev.close()
            dev._close_doorbells()
            for ram in dev.ram_bars.values():
                ram.close()
            if dev.irq is not None:
                dev.irq.close()


def intx_gsi(slot: int, pin: int) -> int:
    """INTx routing, swizzled over IOAPIC pins 16..23 (described to the guest by _PRT)."""
    return 16 + ((slot + pin - 1) % 8)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class ConfigMechanism1:
    """Ports 0xCF8 (CONFIG_ADDRESS, 4 bytes) and 0xCFC..0xCFF (CONFIG_DATA) as one device at
    0xCF8 with 8 ports."""

    def __init__(self, root: PciRoot, reset_control=None) -> None:
        self.root = root
        self.address = 0
        # 0xCF9 (the reset control register) sits inside CONFIG_ADDRESS's four ports; byte
        # accesses to it go to the reset device, as on a PIIX/ICH chipset.
        self.reset_control = reset_control

    def read(self, offset: int, size: int) -> int:
        if offset == 1 and size == 1 and self.reset_control is not None:
            return self.reset_control.read(0, 1)
        if offset < 4:
            if offset == 0 and size == 4:
                return self.address
            return (1 << (8 * size)) - 1
        a = self.address
        if not a & 0x8000_0000 or (a >> 16) & 0xFF != 0:
            return (1 << (8 * size)) - 1
        reg = (a & 0xFC) + (offset - 4)
        return self.root.config_read((a >> 11) & 0x1F, (a >> 8) & 0x7, reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 1 and size == 1 and self.reset_control is not None:
            self.reset_control.write(0, 1, value)
            return
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value & 0x80FF_FFFC
            return
        a = self.address
        if not a & 0x8000_0000 or (a >> 16) & 0xFF != 0:
            return
        reg = (a & 0xFC) + (offset - 4)
        self.root.config_write((a >> 11) & 0x1F, (a >> 8) & 0x7, reg, size, value)


class Ecam:
    """PCI Express enhanced configuration access (MMIO), bus 0 only."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    def read(self, offset: int, size: int) -> int:
        bus, slot, func, reg = offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, \
            offset & 0xFFF
        if bus != 0:
            return (1 << (8 * size)) - 1
        return self.root.config_read(slot, func, reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        bus, slot, func, reg = offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, \
            offset & 0xFFF
        if bus == 0:
            self.root.config_write(slot, func, reg, size, value)
