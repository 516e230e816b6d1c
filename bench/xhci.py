"""Benchmark: the xHCI controller's input latency and doorbell cost, in-process (no KVM).

The controller sits on a FakeVm with the mock xHCI driver (vmrun.testing.xhci_driver); the
devices' event loop runs on its own thread as in ``vmrun up``. Measured:

  - input latency: from ``InputHub.abs()`` (what the VNC server calls) until the tablet's
    Transfer Event is in guest memory, with an interrupt IN TD already posted (the guest's
    usbhid keeps one posted) — the driver's thread spins on the event ring;
  - doorbell cost on the vCPU side: one ``bar_write`` to a doorbell (what a vCPU exit for a
    doorbell costs in Python on top of KVM's exit; with KVM the hot doorbells are
    ioeventfds and cost no exit at all);
  - command round trip: a No-Op command's doorbell until its completion event is in memory.

The issue's comparison with QEMU 7.2's qemu-xhci + usb-tablet needs a host input source
(the VNC server or a QMP ``input-send-event``) on vmrun's side; until then this prints
vmrun's figures alone.

Usage: python bench/xhci.py [--n N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from vmrun_xhci.controller import XhciController
from vmrun_xhci.hid import HidTablet

from vmrun.core.input import InputHub
from vmrun.testing import FakeVm
from vmrun.testing.xhci_driver import NOOP_CMD, TRB, XhciDriver


def _spin_event(drv: XhciDriver, timeout: float = 2.0) -> None:
    """Wait (spinning, as a polling guest would) for the next event's cycle bit."""
    base, _ = drv.segments[drv.ev_seg]
    addr = base + 16 * drv.ev_idx
    end = time.perf_counter() + timeout
    while TRB.unpack(drv.mem.read(addr, 16))[2] & 1 != drv.ev_cycle:
        if time.perf_counter() > end:
            raise TimeoutError("no event")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    n = ap.parse_args().n
    vm = FakeVm()
    hub = InputHub()
    dev = XhciController([HidTablet()], input_hub=hub)
    vm.pci.add(dev, 5)
    vm.pci.assign_bars()
    drv = XhciDriver(vm, 5)
    drv.start(event_segments=(256,), cmd_trbs=256)
    sid = drv.enumerate(1)
    drv.poll_events()
    lat = []
    for i in range(n):
        trb, buf = drv.queue_in(sid, 3, 8)
        vm.sync()
        t0 = time.perf_counter()
        hub.abs(i & 0x7FFF, 0, 0, 0)
        _spin_event(drv)
        lat.append(time.perf_counter() - t0)
        drv.poll_events()
        drv.events.clear()
    bell = []
    target = drv.db + 4 * 0x10           # a slot doorbell: bar_write -> call_soon
    for _ in range(n):
        t0 = time.perf_counter()
        vm.mmio.write(target, 4, 5)
        bell.append(time.perf_counter() - t0)
    vm.sync()
    rtt = []
    for _ in range(n):
        drv.cmd_ring.put(0, 0, NOOP_CMD << 10)
        t0 = time.perf_counter()
        drv.ring_doorbell(0, 0)
        _spin_event(drv)
        rtt.append(time.perf_counter() - t0)
        drv.poll_events()
        drv.events.clear()

    def us(xs: list[float]) -> str:
        xs = sorted(xs)
        return (f"median {statistics.median(xs) * 1e6:7.1f} us, "
                f"p99 {xs[int(len(xs) * 0.99)] * 1e6:7.1f} us")

    print(f"input hub -> HID report in guest memory: {us(lat)}")
    print(f"doorbell bar_write (vCPU side):          {us(bell)}")
    print(f"No-Op command round trip:                {us(rtt)}")
    print(f"controller stats: {dev.stats}")
    dev.close()
    vm.close()


if __name__ == "__main__":
    main()
