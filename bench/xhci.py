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

``--native`` also runs ``vxhci`` (vmrun/testing/native/vxhci.c), a guest user-mode xHCI
driver fragment, under vmrun (``xhci``) and QEMU 7.2 (``qemu-xhci`` + ``usb-tablet``), best
of ``--rounds`` each: a doorbell vmrun serves with an ioeventfd, a doorbell write that
exits to the VMM, and a No-Op command's round trip (doorbell, completion event in memory,
ERDP). The input latency against QEMU needs a host input source on vmrun's side (the VNC
server, or a QMP ``input-send-event``): until one is merged only vmrun's in-process figure
is printed.

Usage: python bench/xhci.py [--n N] [--native [--rounds R] [--guest-n N]]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def native(rounds: int, n: int) -> None:
    """vxhci under vmrun and QEMU: ns per operation, best of ``rounds``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from blk import timed_run

    from vmrun.testing import native as guests

    elf = guests.build("vxhci")
    qemu = shutil.which("qemu-system-x86_64")
    best: dict[str, dict[str, float]] = {"vmrun": {}, "qemu": {}}
    with tempfile.TemporaryDirectory() as d:
        machine = Path(d) / "vxhci.toml"
        machine.write_text(f'''name = "vxhci-bench"
cpus = 1
memory = "256M"
on_reboot = "exit"
[boot]
kernel = "{elf}"
cmdline = "n={n}"
[serial.debugcon]
backend = "stdio"
[devices.usb]
model = "xhci"
''')
        cmds = {"vmrun": [sys.executable, "-m", "vmrun", "up", str(machine)]}
        if qemu:
            cmds["qemu"] = [qemu, "-enable-kvm", "-M", "pc", "-nodefaults", "-no-reboot",
                            "-display", "none", "-cpu", "qemu64,-cx16", "-m", "256",
                            "-kernel", str(elf), "-append", f"n={n}", "-chardev",
                            "stdio,id=dbg", "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
                            "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
                            "-device", "qemu-xhci", "-device", "usb-tablet"]
        for r in range(rounds):
            for name, cmd in cmds.items():
                res, text = timed_run(cmd, 600)
                if "vxhci: done" not in text:
                    print(f"round {r + 1}: {name} did not finish: {text.strip()[-300:]}")
                for test, (secs, _) in res.items():
                    ns = secs / n * 1e9
                    best[name][test] = min(best[name].get(test, ns), ns)
                print(f"round {r + 1}: {name:5s} " + "  ".join(
                    f"{t} {secs / n * 1e9:.0f} ns" for t, (secs, _) in res.items()), flush=True)
    print(f"\nxHCI, native guest, best of {rounds}, n={n} (ns per operation, lower is better)")
    for test in ("bell", "exit", "noop"):
        a, b = best["vmrun"].get(test), best["qemu"].get(test)
        line = f"  {test:5s} vmrun {a or 0:10.0f} ns"
        if b:
            line += f"   qemu {b:10.0f} ns   vmrun/qemu {a / b if a else 0:.2f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--guest-n", type=int, default=20000)
    args = ap.parse_args()
    n = args.n
    if args.native:
        native(args.rounds, args.guest_n)
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
