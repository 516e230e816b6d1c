"""A hostile xHCI driver: hypothesis mixes a real driver's steps with garbage.

Raw TRBs of every type with random fields on the command ring and on transfer rings, Link
TRB loops, pointers outside RAM, random register writes of every size anywhere in BAR 0,
PORTSC and doorbell scribbles, guest memory scribbled over rings, contexts and the ERST,
bus mastering off, HCRST at any point, input events at any time. After every step: nothing
escaped to the vCPU (bus accesses return) or to the event loop (no fault recorded, the loop
still serves, quickly), and at the end an HCRST and a normal enumeration work again.

``VMRUN_FUZZ=1`` runs ten times as many examples (``VMRUN_FUZZ_SCALE``).
"""

from __future__ import annotations

import os
import struct
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrun_xhci.controller import XhciController
from vmrun_xhci.hid import HidKeyboard, HidTablet
from vmrun_xhci.spec import DB, RT

from vmrun.core.input import InputHub
from vmrun.core.pci import COMMAND
from vmrun.testing import FakeVm, PciDriver
from vmrun.testing.xhci_driver import XhciDriver

FUZZ = os.environ.get("VMRUN_FUZZ") == "1"
SCALE = int(os.environ.get("VMRUN_FUZZ_SCALE", "10")) if FUZZ else 1
SLOT = 5
OUTSIDE = 0x7FFF_0000_0000
ADDRS = st.one_of(st.sampled_from([0, 0x100000, 0x180000, 0x1FFFF0, OUTSIDE, 2**64 - 16,
                                   0xFFF_FFF0]), st.integers(0x100000, 0x2FFFFF))
U32 = st.integers(0, 2**32 - 1)
REGS = st.one_of(st.sampled_from([0x40, 0x44, 0x54, 0x58, 0x5C, 0x70, 0x74, 0x78, 0x440,
                                  0x450, 0x480, RT + 0x20, RT + 0x24, RT + 0x28, RT + 0x30,
                                  RT + 0x34, RT + 0x38, RT + 0x3C, RT + 0x40, RT + 0x58]),
                 st.integers(0, 0x3FFF))

actions = st.lists(st.one_of(
    st.tuples(st.just("cmd"), st.integers(0, 63), ADDRS, U32, st.integers(0, 2**22 - 1)),
    st.tuples(st.just("xfer"), st.integers(1, 3), st.integers(0, 63), ADDRS,
              st.integers(0, 0x3FFFF), st.integers(0, 2**22 - 1)),
    st.tuples(st.just("loop"), st.booleans()),
    st.tuples(st.just("reg"), REGS, st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("doorbell"), st.integers(0, 20), U32),
    st.tuples(st.just("scribble"), st.integers(0x100000, 0x1FFFC0),
              st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("input"), st.integers(-10, 0x9000), st.integers(0, 300), st.booleans()),
    st.tuples(st.just("good"), st.sampled_from(["enumerate", "in", "control", "port"])),
    st.tuples(st.just("hcrst")),
    st.tuples(st.just("master"), st.booleans()),
), max_size=80 if FUZZ else 25)


class Hostile:
    def __init__(self) -> None:
        self.vm = FakeVm()
        self.hub = InputHub()
        self.dev = XhciController([HidTablet(), HidKeyboard()], input_hub=self.hub,
                                  scratchpads=2)
        self.vm.pci.add(self.dev, SLOT)
        self.vm.pci.assign_bars()
        self.drv = XhciDriver(self.vm, SLOT)
        self.pci = PciDriver(self.vm)
        self.sid = 0
        self.drv.start()

    def step(self, act: tuple) -> None:
        d, kind = self.drv, act[0]
        if kind == "cmd":
            _, typ, param, status, flags = act
            d.cmd_ring.put(param, status, typ << 10 | (flags & 0x3FF) | (flags >> 10) << 16)
            d.ring_doorbell(0, 0)
        elif kind == "xfer":
            _, sid, dci, param, length, flags = act
            ring = d.rings.get((sid, 1 if dci & 1 else 3)) or d.rings.get((sid, 1))
            if ring is not None:
                ring.put(param, length, (dci << 10) | (flags & 0x3FF) | (flags >> 10) << 16)
                d.ring_doorbell(sid, 1 if (sid, 1) in d.rings and dci & 1 else 3)
        elif kind == "loop":
            ring = d.cmd_ring if act[1] or not d.rings else next(iter(d.rings.values()))
            at = ring.base + 16 * ring.enq
            d.mem.write(at, struct.pack("<QII", at, 0, 6 << 10 | ring.cycle))
            d.ring_doorbell(0, 0) if ring is d.cmd_ring else d.ring_doorbell(1, 1)
        elif kind == "reg":
            _, off, size, value = act
            off &= ~(size - 1)
            if off + size <= 0x4000:
                self.vm.mmio.write(d.regs + off, size, value & ((1 << 8 * size) - 1))
                assert isinstance(self.vm.mmio.read(d.regs + off, size), int)
        elif kind == "doorbell":
            self.vm.mmio.write(d.regs + DB + 4 * act[1], 4, act[2])
        elif kind == "scribble":
            d.mem.write(act[1], act[2])
        elif kind == "input":
            _, pos, code, down = act
            self.hub.abs(pos, pos // 2, code % 3 - 1, code & 7)
            self.hub.key(code, down)
        elif kind == "good":
            self.good(act[1])
        elif kind == "hcrst":
            d.op_write(0x00, 2)
        elif kind == "master":
            cmd = self.pci.read(SLOT, 0, COMMAND, 2)
            self.pci.write(SLOT, 0, COMMAND, 2, cmd | 4 if act[1] else cmd & ~4)

    def good(self, what: str) -> None:
        """A legitimate step; failures are fine (the device may be halted by now), as long as
        nothing escapes."""
        d = self.drv
        try:
            if what == "enumerate":
                self.sid = d.enumerate(1)
            elif what == "in" and self.sid:
                d.queue_in(self.sid, 3, 8)
            elif what == "control" and self.sid:
                d.control(self.sid, 0x80, 6, 0x0100, 0, 18)
            elif what == "port":
                d.reset_port(2)
        except (AssertionError, KeyError, MemoryError):
            pass

    def check(self) -> None:
        t0 = time.monotonic()
        self.vm.sync(timeout=10)
        assert time.monotonic() - t0 < 5, "the controller kept the loop"
        assert self.vm.loop.faults == [], self.vm.loop.faults
        assert self.dev.stats["faults"] == 0

    def recover(self) -> None:
        """Bus mastering on, HCRST, set-up, one device enumerated, a report delivered."""
        cmd = self.pci.read(SLOT, 0, COMMAND, 2)
        self.pci.write(SLOT, 0, COMMAND, 2, cmd | 6)
        d = self.drv
        d.start()
        sid = d.enumerate(1)
        trb, buf = d.queue_in(sid, 3, 8)
        self.hub.abs(100, 200, 0, 1)
        ev, data = d.wait_in(sid, 3, trb, buf, 8)
        assert data[:5] == struct.pack("<BHH", 1, 100, 200)

    def close(self) -> None:
        self.dev.close()
        self.vm.close()


@settings(deadline=None, max_examples=40 * SCALE,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(acts=actions)
def test_hostile_driver(acts: list) -> None:
    h = Hostile()
    try:
        for act in acts:
            h.step(act)
            h.check()
        h.recover()
        h.check()
    finally:
        h.close()
