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
ERDP).

``--latency N`` runs ``vxhci lat=N``: the guest enumerates the tablet and keeps one
interrupt IN TD posted; the host injects an absolute pointer event and spins (yielding)
until the guest has the report in RAM, read from the host side: vmrun's machine runs in
this process (the event goes to ``InputHub.abs``, as from its VNC server), QEMU's RAM is a
shared file and the event goes in through QMP ``input-send-event`` (its VNC server calls
the same input layer). Median and p90 of N, vmrun against QEMU.

Usage: python bench/xhci.py [--n N] [--no-native | --rounds R --guest-n N] [--latency N]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import statistics
import struct
import subprocess
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
    """Wait (spinning, as a polling guest would, but yielding: the loop shares this
    process's GIL) for the next event's cycle bit."""
    base, _ = drv.segments[drv.ev_seg]
    addr = base + 16 * drv.ev_idx
    end = time.perf_counter() + timeout
    while TRB.unpack(drv.mem.read(addr, 16))[2] & 1 != drv.ev_cycle:
        if time.perf_counter() > end:
            raise TimeoutError("no event")
        time.sleep(0)         # yield the GIL to the devices' loop


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


STATE = 0x01100000          # vxhci: u64 ready, u64 count


def _rounds(read_u64, inject, n: int) -> list[float]:
    out = []
    for i in range(n):
        end = time.monotonic() + 20
        while read_u64(STATE) != i + 1:
            if time.monotonic() > end:
                raise TimeoutError(f"guest not ready for round {i}")
            time.sleep(0.0001)
        time.sleep(0.002)                     # the TD's doorbell is served: it waits for input
        t0 = time.perf_counter()
        inject(100 + (i % 2) * 20000)         # a new position every time
        while read_u64(STATE + 8) != i + 1:
            if time.perf_counter() - t0 > 5:
                raise TimeoutError(f"no report in round {i}")
            time.sleep(0)                     # yield: vmrun's loop shares this process
        out.append(time.perf_counter() - t0)
    return out


def vmrun_latency(elf: Path, n: int) -> list[float]:
    from vmrun.config import load_machine
    from vmrun.core.exits import ExitCode
    from vmrun.core.host import HostContext
    from vmrun.machine import Machine

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "lat.toml"
        path.write_text(f'''name = "vxhci-lat"
cpus = 1
memory = "256M"
on_reboot = "exit"
[boot]
kernel = "{elf}"
cmdline = "lat={n}"
[devices.usb]
model = "xhci"
''')
        cfg = load_machine(path)
        host = HostContext()
        m = Machine(cfg, {}, debug_out=lambda data: None, host=host)
        try:
            m.start()
            mem = m.vm.memory
            return _rounds(lambda a: struct.unpack("<Q", mem.read(a, 8))[0],
                           lambda v: host.input.abs(v, v), n)
        finally:
            m.stop(ExitCode.POWER_OFF, "benchmark done")
            m.wait(5)
            m.close()
            host.close()


def qemu_latency(qemu: str, elf: Path, n: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        ram, sock_path = Path("/dev/shm") / f"vxhci-{os.getpid()}", Path(d) / "qmp.sock"
        cmd = [qemu, "-enable-kvm", "-M", "pc,memory-backend=ram", "-nodefaults",
               "-no-reboot", "-display", "none", "-cpu", "qemu64,-cx16", "-m", "256",
               "-object", f"memory-backend-file,id=ram,size=256M,mem-path={ram},share=on",
               "-kernel", str(elf), "-append", f"lat={n}",
               "-chardev", f"file,id=dbg,path={d}/dbg.log",
               "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
               "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
               "-device", "qemu-xhci", "-device", "usb-tablet",
               "-qmp", f"unix:{sock_path},server=on,wait=off"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 20
            while not sock_path.exists() or not ram.exists():
                if time.monotonic() > end or proc.poll() is not None:
                    raise RuntimeError("QEMU did not start")
                time.sleep(0.05)
            qmp = socket.socket(socket.AF_UNIX)
            qmp.connect(str(sock_path))
            f = qmp.makefile("rwb")
            f.readline()
            f.write(b'{"execute": "qmp_capabilities"}\n')
            f.flush()
            f.readline()
            fd = os.open(ram, os.O_RDONLY)
            mem = mmap.mmap(fd, 256 << 20, prot=mmap.PROT_READ)

            def inject(v: int) -> None:
                events = [{"type": "abs", "data": {"axis": a, "value": v}} for a in "xy"]
                f.write(json.dumps({"execute": "input-send-event",
                                    "arguments": {"events": events}}).encode() + b"\n")
                f.flush()

            try:
                return _rounds(lambda a: struct.unpack_from("<Q", mem, a)[0], inject, n)
            finally:
                mem.close()
                os.close(fd)
                qmp.close()
        finally:
            proc.kill()
            proc.wait()
            ram.unlink(missing_ok=True)


def latency(n: int) -> None:
    from vmrun.testing import native as guests

    elf = guests.build("vxhci")
    qemu = shutil.which("qemu-system-x86_64")

    def fig(xs: list[float]) -> str:
        xs = sorted(xs)
        med, p90 = statistics.median(xs) * 1e6, xs[len(xs) * 9 // 10] * 1e6
        return f"median {med:7.0f} us, p90 {p90:7.0f} us"

    ours = vmrun_latency(elf, n)
    print(f"host input event -> HID report in guest RAM, n={n}")
    print(f"  vmrun (xhci + tablet):          {fig(ours)}")
    if qemu:
        theirs = qemu_latency(qemu, elf, n)
        print(f"  qemu  (qemu-xhci + usb-tablet): {fig(theirs)}")
        print(f"  vmrun/qemu (median): {statistics.median(ours) / statistics.median(theirs):.2f}"
              " (goal <= 1)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--native", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--guest-n", type=int, default=20000)
    ap.add_argument("--latency", type=int, default=200, help="rounds (0: none)")
    args = ap.parse_args()
    n = args.n
    if args.native:
        native(args.rounds, args.guest_n)
    if args.latency:
        latency(args.latency)
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
