"""Benchmark: one shared device event loop vs one loop thread per device.

N "devices" each own a doorbell eventfd; "vCPU" threads (one per device) ring their doorbell
and wait for the device's completion eventfd, as a guest driver waits for an interrupt. The
device callback does a little Python work (like popping a virtqueue chain). Measured: round
trips per second over all devices, with every device on one :class:`EventLoop` thread, and
with one :class:`EventLoop` per device. This is the measurement behind the choice in
:mod:`vmrun.core.eventloop`'s docstring. Usage: python bench/eventloop.py [devices] [seconds]
"""

from __future__ import annotations

import os
import select
import statistics
import sys
import threading
import time

from vmrun.core.eventloop import EventLoop


def device_work() -> int:
    s = 0
    for i in range(50):          # ~ a chain walk and a used-ring update in Python
        s += i * i
    return s


def run(ndev: int, shared: bool, seconds: float) -> float:
    loops = [EventLoop("shared")] if shared else [EventLoop(f"dev{i}") for i in range(ndev)]
    bells = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(ndev)]
    irqs = [os.eventfd(0) for _ in range(ndev)]
    for i in range(ndev):
        def serve(fd: int, i: int = i) -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            device_work()
            os.eventfd_write(irqs[i], 1)
        loops[0 if shared else i].add(bells[i], serve)
    for lp in loops:
        lp.start()
    counts = [0] * ndev
    stop = threading.Event()

    def vcpu(i: int) -> None:
        p = select.poll()
        p.register(irqs[i], select.POLLIN)
        while not stop.is_set():
            os.eventfd_write(bells[i], 1)
            p.poll(1000)
            os.eventfd_read(irqs[i])
            counts[i] += 1

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(ndev)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    for lp in loops:
        lp.close()
    for fd in bells + irqs:
        os.close(fd)
    return sum(counts) / seconds


def main() -> None:
    ndevs = [int(sys.argv[1])] if len(sys.argv) > 1 else [1, 2, 4]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    for n in ndevs:
        shared, per = [], []
        for _ in range(3):
            shared.append(run(n, True, seconds))
            per.append(run(n, False, seconds))
        s, p = statistics.median(shared), statistics.median(per)
        print(f"{n} devices: one loop {s:,.0f} round trips/s, a loop per device {p:,.0f}/s "
              f"(ratio {s / p:.2f})")


if __name__ == "__main__":
    main()
