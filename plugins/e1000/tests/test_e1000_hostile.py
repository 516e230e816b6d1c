"""A hostile e1000 driver: hypothesis mixes a real driver's steps with garbage register writes,
descriptors and frames. Nothing may escape to a vCPU (bar_read/bar_write) or to the event
loop's guard, work stays bounded, and a driver reset always brings the NIC back."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrun_e1000.device import E1000

from vmrun.testing import FakeVm
from vmrun.testing.e1000 import RDT, TDT, E1000Driver, Offload
from vmrun.testing.nic import LoopbackBackend

MAC = bytes.fromhex("525400abcdef")
SCALE = int(os.environ.get("VMRUN_FUZZ_SCALE", "10" if os.environ.get("VMRUN_FUZZ") else "1"))
REGS = [0x0000, 0x0008, 0x0010, 0x0014, 0x0018, 0x0020, 0x00C0, 0x00C4, 0x00C8, 0x00D0,
        0x00D8, 0x0100, 0x0400, 0x2800, 0x2804, 0x2808, 0x2810, 0x2818, 0x2820, 0x282C,
        0x3800, 0x3804, 0x3808, 0x3810, 0x3818, 0x3820, 0x382C, 0x5000, 0x5200, 0x5400,
        0x5404, 0x5600, 0x4000, 0x4088, 0x408C, 0x40FC, 0x1FFFC]
VALUES = st.one_of(st.sampled_from([0, 1, 0xFFFFFFFF, 0x80000000, 0x04000000, 0x2, 0x40,
                                    0xFFFF, 0x10000, 0xF0000000]),
                   st.integers(0, 0xFFFFFFFF))

step = st.one_of(
    st.tuples(st.just("reg"), st.sampled_from(REGS), VALUES),
    st.tuples(st.just("read"), st.integers(0, 0x1FFFF), st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("io"), st.integers(0, 0x3F), VALUES),
    st.tuples(st.just("txdesc"), st.integers(0, 63), st.binary(min_size=16, max_size=16)),
    st.tuples(st.just("rxdesc"), st.integers(0, 63), st.binary(min_size=16, max_size=16)),
    st.tuples(st.just("send"), st.integers(14, 3000), st.booleans()),
    st.tuples(st.just("tso"), st.integers(0, 255), st.integers(0, 3000)),
    st.tuples(st.just("inject"), st.binary(min_size=0, max_size=2000), st.booleans()),
    st.tuples(st.just("kick"), st.integers(0, 0xFFFF), st.booleans()),
    st.tuples(st.just("reset"), st.just(0), st.just(0)),
)


class Rig:
    """One NIC reused across examples (a fresh FakeVm per example would dominate the time)."""

    def __init__(self) -> None:
        self.vm = FakeVm(16 << 20)
        self.be = LoopbackBackend(self.vm.loop)
        self.dev = E1000(self.be, MAC)
        self.vm.pci.add(self.dev, 4)
        self.vm.pci.assign_bars()
        self.drv = E1000Driver(self.vm, 4, mem_start=0x100000, mem_end=0xF00000)

    def fresh(self) -> None:
        self.drv.alloc.next = 0x100000
        self.be.sent.clear()
        self.be._queue.clear()
        self.be.full = False
        self.drv.reset()
        self.drv.up()


_rig: Rig | None = None


def rig() -> Rig:
    global _rig
    if _rig is None:
        _rig = Rig()
    return _rig


def run_step(r: Rig, s: tuple) -> None:
    kind, a, b = s
    d = r.drv
    if kind == "reg":
        d.wr(a, b)
    elif kind == "read":
        r.vm.mmio.read(d.regs + (a & ~(b - 1)), b)
    elif kind == "io":
        r.vm.pio.write(d.io + (a & ~3), 4, b)
        r.vm.pio.read(d.io + (a & ~3), 4)
    elif kind == "txdesc":
        r.vm.memory.write(d.tx_ring + 16 * a, b)
    elif kind == "rxdesc":
        r.vm.memory.write(d.rx_ring + 16 * a, b)
    elif kind == "send":
        if d.alloc.next > 0xE00000:
            d.alloc.next = 0x200000
        d.send(b"\x02" * 6 + MAC + b"\x08\x00" + bytes(a - 14), split=[7] if b else None)
    elif kind == "tso":
        if d.alloc.next > 0xE00000:
            d.alloc.next = 0x200000
        off = Offload(ipcss=a & 0x3F, ipcso=(a * 7) & 0xFF, tucss=(a * 3) & 0xFF,
                      tucso=(a * 5) & 0xFF, tso=True, mss=b & 0x7FF, hdr_len=a,
                      tcp=bool(a & 1), ipv4=bool(a & 2))
        d.send(os.urandom(max(b, 14)), offload=off, ip_csum=True, l4_csum=True)
    elif kind == "inject":
        r.be.inject((MAC if b else b"\xff" * 6) + a)
    elif kind == "kick":
        d.wr(TDT if b else RDT, a)
    else:
        d.reset()
        d.up()


@settings(max_examples=150 * SCALE, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(step, min_size=1, max_size=25 * (2 if SCALE > 1 else 1)))
def test_hostile_driver_cannot_break_out(steps):
    r = rig()
    r.fresh()
    faults_before = len(r.vm.loop.faults)
    for s in steps:
        run_step(r, s)
    r.vm.sync()
    r.vm.sync()
    assert len(r.vm.loop.faults) == faults_before, r.vm.loop.faults[-1]
    # Bounded: nothing held beyond one frame, nothing pending beyond one packet's segments.
    assert len(r.dev._rx_held) <= 1
    # A driver reset always recovers the NIC.
    r.be.full = False
    r.be._queue.clear()
    r.drv.reset()
    r.drv.alloc.next = 0x100000
    r.drv.up()
    r.be.sent.clear()
    f = b"\x02" * 6 + MAC + b"\x88\xb5" + b"ok" * 40
    r.drv.send(f)
    assert r.be.wait_sent(1), "the NIC did not come back after a reset"
    assert r.be.sent[0] == f
    r.be.inject(MAC + b"\x02" * 6 + b"\x88\xb5" + b"in" * 40)
    got = r.drv.receive(1)
    assert got and got[-1][0].endswith(b"in" * 40)


def test_zero_and_huge_ring_lengths_do_not_hang():
    r = rig()
    r.fresh()
    d = r.drv
    d.wr(0x3808, 0)                                   # TDLEN 0 with TDT at 0: no ring, idle
    d.wr(TDT, 0)
    d.wr(0x3808, 0xFFF80)                             # the largest ring, mostly garbage
    d.wr(0x3800, 0x100000)
    r.vm.memory.write(0x100000, struct.pack("<QII", 0x300000, 60 | 0x0B << 24, 0) * 10)
    d.wr(TDT, 10)
    r.vm.sync()
    assert not r.vm.loop.faults
    r.vm.sync()
