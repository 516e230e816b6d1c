"""A mock xHCI driver for tests: what an OS's xHCI driver does, on a FakeVm's memory.

:class:`XhciDriver` finds the controller's registers from BAR 0, lays out the DCBAA, the
command ring, an event ring (one or more segments) and device contexts in guest memory, and
drives the controller through its registers only: reset, run, port reset, Enable Slot,
Address Device, Configure Endpoint, control transfers (Setup / Data / Status), interrupt IN
TDs, and reading events. It knows nothing of the device model behind the registers, so it
tests any xHCI emulation::

    drv = XhciDriver(vm, slot=5)
    drv.start()
    port = drv.connected_ports()[0]
    drv.reset_port(port)
    sid = drv.enable_slot()
    drv.address_device(sid, port)
    desc = drv.control_in(sid, 0x80, 6, 0x0100, 0, 18)
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from vmrun.testing.pcidriver import PciDriver

TRB = struct.Struct("<QII")
# TRB types and a few completion codes (xHCI 1.1, tables 6-90 and 6-91).
NORMAL, SETUP, DATA, STATUS, LINK, EVENT_DATA, NOOP_TR = 1, 2, 3, 4, 6, 7, 8
ENABLE_SLOT, DISABLE_SLOT, ADDRESS_DEVICE, CONFIGURE_EP, EVALUATE_CTX = 9, 10, 11, 12, 13
RESET_EP, STOP_EP, SET_TR_DEQ, RESET_DEVICE, NOOP_CMD = 14, 15, 16, 17, 23
TRANSFER_EVENT, COMMAND_COMPLETION, PORT_STATUS_CHANGE = 32, 33, 34
SUCCESS, SHORT_PACKET = 1, 13
IOC, ISP, IDT, CH, DIR_IN = 1 << 5, 1 << 2, 1 << 6, 1 << 4, 1 << 16


class XhciTimeout(AssertionError):
    pass


@dataclass
class Event:
    param: int
    status: int
    control: int
    addr: int

    @property
    def type(self) -> int:
        return (self.control >> 10) & 0x3F

    @property
    def cc(self) -> int:
        return self.status >> 24

    @property
    def length(self) -> int:
        return self.status & 0xFFFFFF

    @property
    def slot(self) -> int:
        return self.control >> 24

    @property
    def dci(self) -> int:
        return (self.control >> 16) & 0x1F


class Ring:
    """A producer ring in guest memory, closed by a Link TRB that toggles the cycle."""

    def __init__(self, mem, base: int, ntrbs: int) -> None:
        self.mem, self.base, self.n = mem, base, ntrbs
        self.enq, self.cycle = 0, 1
        mem.write(base, bytes(16 * ntrbs))
        self._link()

    def _link(self) -> None:
        self.mem.write(self.base + 16 * (self.n - 1),
                       TRB.pack(self.base, 0, LINK << 10 | 1 << 1 | (self.cycle ^ 1)))

    def put(self, param: int, status: int, control: int) -> int:
        """Enqueue one TRB (cycle bit set here); returns its address."""
        addr = self.base + 16 * self.enq
        self.mem.write(addr, TRB.pack(param, status, (control & ~1) | self.cycle))
        self.enq += 1
        if self.enq == self.n - 1:           # hand the Link TRB over, then wrap
            link = self.base + 16 * (self.n - 1)
            self.mem.write(link + 12, struct.pack(
                "<I", LINK << 10 | 1 << 1 | (CH if control & CH else 0) | self.cycle))
            self.enq = 0
            self.cycle ^= 1
        return addr

    @property
    def dequeue_pointer(self) -> int:
        return self.base + 16 * self.enq | self.cycle


class XhciDriver:
    """Drives an xHCI controller at PCI ``slot`` of a FakeVm."""

    def __init__(self, vm, slot: int, func: int = 0, base: int = 0x100000,
                 size: int = 0x200000) -> None:
        self.vm = vm
        self.mem = vm.memory
        self.pci = PciDriver(vm)
        self.slot_addr = (slot, func)
        self.regs = self.pci.bar_address(slot, func, 0)
        self.cap_len = self.read(0) & 0xFF
        self.op = self.regs + self.cap_len
        self.rt = self.regs + (self.read(0x18) & ~0x1F)
        self.db = self.regs + (self.read(0x14) & ~0x3)
        hcs1 = self.read(0x04)
        self.max_slots, self.max_intrs, self.nports = hcs1 & 0xFF, (hcs1 >> 8) & 0x7FF, \
            hcs1 >> 24
        hcc = self.read(0x10)
        self.csz = 64 if hcc & 4 else 32
        hcs2 = self.read(0x08)
        self.scratchpads = ((hcs2 >> 21) & 0x1F) << 5 | hcs2 >> 27
        self._base, self._next, self._end = base, base, base + size
        self.events: list[Event] = []
        self.rings: dict[tuple[int, int], Ring] = {}
        self.out_ctx: dict[int, int] = {}

    # -- registers ---------------------------------------------------------------------------
    def read(self, off: int) -> int:
        return self.vm.mmio.read(self.regs + off, 4)

    def write(self, off: int, value: int) -> None:
        self.vm.mmio.write(self.regs + off, 4, value & 0xFFFFFFFF)

    def op_read(self, off: int) -> int:
        return self.vm.mmio.read(self.op + off, 4)

    def op_write(self, off: int, value: int) -> None:
        self.vm.mmio.write(self.op + off, 4, value & 0xFFFFFFFF)

    def op_write64(self, off: int, value: int) -> None:
        self.op_write(off, value & 0xFFFFFFFF)
        self.op_write(off + 4, value >> 32)

    def rt_read(self, off: int) -> int:
        return self.vm.mmio.read(self.rt + off, 4)

    def rt_write(self, off: int, value: int) -> None:
        self.vm.mmio.write(self.rt + off, 4, value & 0xFFFFFFFF)

    def rt_write64(self, off: int, value: int) -> None:
        self.rt_write(off, value & 0xFFFFFFFF)
        self.rt_write(off + 4, value >> 32)

    def portsc(self, port: int) -> int:
        return self.op_read(0x400 + 0x10 * (port - 1))

    def set_portsc(self, port: int, value: int) -> None:
        self.op_write(0x400 + 0x10 * (port - 1), value)

    def ring_doorbell(self, target: int, value: int) -> None:
        self.vm.mmio.write(self.db + 4 * target, 4, value)

    def alloc(self, size: int, align: int = 64) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self._end:
            raise MemoryError("the mock driver's memory is used up")
        self._next = addr + size
        self.mem.write(addr, bytes(size))
        return addr

    def extended_capabilities(self) -> list[tuple[int, int]]:
        """(offset, capability ID) along the extended capability list."""
        out = []
        off = (self.read(0x10) >> 16) << 2
        while off and len(out) < 32:
            dw = self.read(off)
            out.append((off, dw & 0xFF))
            nxt = (dw >> 8) & 0xFF
            off = off + 4 * nxt if nxt else 0
        return out

    # -- bring-up ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.op_write(0x00, self.op_read(0x00) & ~1)
        self.wait(lambda: self.op_read(0x04) & 1, "HCHalted")
        self.op_write(0x00, 1 << 1)
        self.wait(lambda: not self.op_read(0x00) & 2 and not self.op_read(0x04) & 1 << 11,
                  "HCRST done")
        self.events = []

    def setup(self, cmd_trbs: int = 32, event_segments: tuple[int, ...] = (32,),
              imod: int = 0, scratchpad_pointers: list[int] | None = None) -> None:
        """Everything before R/S: MaxSlotsEn, DCBAA (+ scratchpads), command ring, ERST."""
        self._next = self._base
        self.rings, self.out_ctx = {}, {}
        self.op_write(0x38, self.max_slots)
        self.dcbaa = self.alloc(8 * (self.max_slots + 1))
        self.op_write64(0x30, self.dcbaa)
        if self.scratchpads:
            pointers = scratchpad_pointers
            if pointers is None:
                pointers = [self.alloc(4096, 4096) for _ in range(self.scratchpads)]
            array = self.alloc(8 * len(pointers))
            self.mem.write(array, struct.pack(f"<{len(pointers)}Q", *pointers))
            self.mem.write(self.dcbaa, struct.pack("<Q", array))
        self.cmd_ring = Ring(self.mem, self.alloc(16 * cmd_trbs), cmd_trbs)
        self.op_write64(0x18, self.cmd_ring.base | 1)
        self.segments = [(self.alloc(16 * n), n) for n in event_segments]
        erst = self.alloc(16 * len(self.segments))
        for i, (base, n) in enumerate(self.segments):
            self.mem.write(erst + 16 * i, struct.pack("<QII", base, n, 0))
        self.ev_seg, self.ev_idx, self.ev_cycle = 0, 0, 1
        self.rt_write(0x20 + 0x04, imod)
        self.rt_write(0x20 + 0x08, len(self.segments))
        self.rt_write64(0x20 + 0x18, self.segments[0][0])
        self.rt_write64(0x20 + 0x10, erst)
        self.rt_write(0x20, 1 << 1)                        # IMAN.IE

    def run(self) -> None:
        self.op_write(0x00, self.op_read(0x00) | 1 | 1 << 2)     # R/S, INTE
        self.wait(lambda: not self.op_read(0x04) & 1, "running")

    def start(self, **setup) -> None:
        self.reset()
        self.setup(**setup)
        self.run()

    # -- events ------------------------------------------------------------------------------
    def poll_events(self) -> list[Event]:
        """Consume new events from the event ring (ERDP advanced, EHB cleared)."""
        self.vm.sync()
        new = []
        while True:
            base, n = self.segments[self.ev_seg]
            addr = base + 16 * self.ev_idx
            param, status, control = TRB.unpack(self.mem.read(addr, 16))
            if control & 1 != self.ev_cycle:
                break
            new.append(Event(param, status, control, addr))
            self.ev_idx += 1
            if self.ev_idx == n:
                self.ev_idx = 0
                self.ev_seg += 1
                if self.ev_seg == len(self.segments):
                    self.ev_seg = 0
                    self.ev_cycle ^= 1
        if new:
            base, _ = self.segments[self.ev_seg]
            self.rt_write64(0x20 + 0x18, (base + 16 * self.ev_idx) | 1 << 3)
            self.vm.sync()
        self.events += new
        return new

    def wait_event(self, match, what: str, timeout: float = 5.0) -> Event:
        end = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if match(ev):
                    return self.events.pop(i)
            if time.monotonic() > end:
                raise XhciTimeout(f"no {what} event; have {self.events}")
            if not self.poll_events():
                time.sleep(0.001)

    def wait(self, cond, what: str, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise XhciTimeout(f"timed out waiting for {what}")
            self.vm.sync()

    # -- commands ----------------------------------------------------------------------------
    def command(self, kind: int, param: int = 0, status: int = 0, flags: int = 0) -> Event:
        addr = self.cmd_ring.put(param, status, kind << 10 | flags)
        self.ring_doorbell(0, 0)
        return self.wait_event(lambda e: e.type == COMMAND_COMPLETION and e.param == addr,
                               f"completion of command {kind}")

    def enable_slot(self) -> int:
        ev = self.command(ENABLE_SLOT)
        assert ev.cc == SUCCESS, ev
        return ev.slot

    def connected_ports(self) -> list[int]:
        return [p for p in range(1, self.nports + 1) if self.portsc(p) & 1]

    def reset_port(self, port: int) -> int:
        sc = self.portsc(port)
        self.set_portsc(port, (sc & 0x0E00C3E0 & ~(0xF << 5)) | 1 << 4)       # PR
        self.wait(lambda: self.portsc(port) & 1 << 21, f"port {port} reset change")
        sc = self.portsc(port)
        self.set_portsc(port, (sc & 0x0E00C3E0 & ~(0xF << 5)) | 0x00FE0000)   # W1C changes
        return sc

    def input_context(self, add: int, drop: int = 0) -> int:
        ctx = self.alloc(33 * self.csz)
        self.mem.write(ctx, struct.pack("<II", drop, add))
        return ctx

    def address_device(self, sid: int, port: int, bsr: bool = False, speed: int = 3,
                       max_packet: int = 64) -> Event:
        if sid not in self.out_ctx:
            self.out_ctx[sid] = self.alloc(32 * self.csz)
            self.mem.write(self.dcbaa + 8 * sid, struct.pack("<Q", self.out_ctx[sid]))
        ring = self.rings.get((sid, 1)) or Ring(self.mem, self.alloc(16 * 32), 32)
        self.rings[(sid, 1)] = ring
        ictx = self.input_context(add=3)
        self.mem.write(ictx + self.csz, struct.pack("<4I", 1 << 27 | speed << 20, port << 16,
                                                    0, 0))
        self.mem.write(ictx + 2 * self.csz, struct.pack("<IIQI", 0, 3 << 1 | 4 << 3 |
                                                        max_packet << 16,
                                                        ring.dequeue_pointer, 8))
        return self.command(ADDRESS_DEVICE, ictx, 0, sid << 24 | (1 << 9 if bsr else 0))

    def configure_endpoint(self, sid: int, eps: list[tuple[int, int, int]],
                           drop: int = 0) -> Event:
        """``eps``: (DCI, endpoint type, max packet) to add."""
        add = 1
        for dci, _, _ in eps:
            add |= 1 << dci
        ictx = self.input_context(add=add, drop=drop)
        last = max([dci for dci, _, _ in eps] or [1])
        self.mem.write(ictx + self.csz, struct.pack("<I", last << 27))
        for dci, ept, mps in eps:
            ring = Ring(self.mem, self.alloc(16 * 32), 32)
            self.rings[(sid, dci)] = ring
            self.mem.write(ictx + (dci + 1) * self.csz, struct.pack(
                "<IIQI", 4 << 16, 3 << 1 | ept << 3 | mps << 16, ring.dequeue_pointer, mps))
        return self.command(CONFIGURE_EP, ictx, 0, sid << 24)

    def slot_state(self, sid: int) -> int:
        return struct.unpack("<I", self.mem.read(self.out_ctx[sid] + 12, 4))[0] >> 27

    def ep_state(self, sid: int, dci: int) -> int:
        return struct.unpack("<I", self.mem.read(self.out_ctx[sid] + dci * self.csz, 4))[0] & 7

    # -- transfers ---------------------------------------------------------------------------
    def control(self, sid: int, rtype: int, req: int, value: int, index: int, length: int,
                data: bytes = b"") -> tuple[Event, bytes]:
        """One control transfer on endpoint 0: (the Status stage's event or the error event,
        the IN data received)."""
        ring = self.rings[(sid, 1)]
        setup = struct.unpack("<Q", struct.pack("<BBHHH", rtype, req, value, index, length))[0]
        into = bool(rtype & 0x80)
        trt = (3 if into else 2) if length else 0
        ring.put(setup, 8, SETUP << 10 | IDT | trt << 16)
        buf = 0
        if length:
            buf = self.alloc(max(length, 1), 16)
            if not into:
                self.mem.write(buf, data[:length])
            ring.put(buf, length, DATA << 10 | ISP | (DIR_IN if into else 0))
        status = ring.put(0, 0, STATUS << 10 | IOC | (0 if into and length else DIR_IN))
        self.ring_doorbell(sid, 1)
        ev = self.wait_event(lambda e: e.type == TRANSFER_EVENT and e.slot == sid and
                             e.dci == 1 and (e.param == status or e.cc not in
                                             (SUCCESS, SHORT_PACKET)),
                             "control transfer")
        got = b""
        if into and length:
            short = [e for e in self.events if e.type == TRANSFER_EVENT and e.slot == sid and
                     e.cc == SHORT_PACKET]
            n = length - (short[-1].length if short else 0)
            for e in short:
                self.events.remove(e)
            got = self.mem.read(buf, n)
        return ev, got

    def control_in(self, sid: int, rtype: int, req: int, value: int, index: int,
                   length: int) -> bytes:
        ev, data = self.control(sid, rtype, req, value, index, length)
        assert ev.cc == SUCCESS, ev
        return data

    def queue_in(self, sid: int, dci: int, length: int) -> tuple[int, int]:
        """Post one interrupt/bulk IN TD (one Normal TRB, ISP|IOC): (TRB address, buffer)."""
        buf = self.alloc(length, 16)
        trb = self.rings[(sid, dci)].put(buf, length, NORMAL << 10 | ISP | IOC)
        self.ring_doorbell(sid, dci)
        return trb, buf

    def wait_in(self, sid: int, dci: int, trb: int, buf: int, length: int,
                timeout: float = 5.0) -> tuple[Event, bytes]:
        ev = self.wait_event(lambda e: e.type == TRANSFER_EVENT and e.param == trb,
                             "IN transfer", timeout)
        return ev, self.mem.read(buf, length - ev.length)

    # -- a whole device -----------------------------------------------------------------------
    def enumerate(self, port: int) -> int:
        """Reset the port, then Enable Slot, Address Device (BSR then not), read the device
        descriptor, Configure Endpoint for EP 1 IN and SET_CONFIGURATION 1: the slot ID."""
        self.reset_port(port)
        sid = self.enable_slot()
        ev = self.address_device(sid, port, bsr=True)
        assert ev.cc == SUCCESS, ev
        ev = self.address_device(sid, port)
        assert ev.cc == SUCCESS, ev
        desc = self.control_in(sid, 0x80, 6, 0x0100, 0, 18)
        assert len(desc) == 18 and desc[1] == 1, desc
        ev = self.configure_endpoint(sid, [(3, 7, 8)])
        assert ev.cc == SUCCESS, ev
        ev, _ = self.control(sid, 0x00, 9, 1, 0, 0)
        assert ev.cc == SUCCESS, ev
        return sid
