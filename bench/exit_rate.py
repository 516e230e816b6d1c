"""Benchmark: vmrun's I/O-port and MMIO exit rates against a bare C KVM loop on the same guests.

Two real-mode guests, run by both vmrun and ``bench/c/kvm_exit_loop.c``:

* port: N `out 0x10, al` to an unused port, then `hlt` (vmrun counts them as unhandled);
* MMIO: N `mov [0], al` with DS = 0xD000, i.e. byte stores to guest-physical 0xD0000, outside
  the 64 KiB of RAM, then `hlt`; vmrun has a tiny counting device inserted there on vm.mmio.

Runs alternate (C port, vmrun port, C MMIO, vmrun MMIO, ...) and medians are reported, as
ratios vmrun / C. Goals: port >= 0.9, MMIO >= 0.85.
Usage: python bench/exit_rate.py [N] [rounds]
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmrun.core.exits import ExitCode
from vmrun.core.vm import Vm

HERE = Path(__file__).parent
MMIO_ADDR = 0xD0000
GOALS = {"pio": 0.9, "mmio": 0.85}


def guest_code(n: int) -> bytes:
    """mov ecx, n; 1: out 0x10, al; dec ecx; jnz 1b; hlt"""
    return bytes([0x66, 0xB9]) + n.to_bytes(4, "little") + bytes(
        [0xE6, 0x10, 0x66, 0x49, 0x75, 0xFA, 0xF4])


def mmio_guest_code(n: int) -> bytes:
    """mov ax, 0xd000; mov ds, ax; mov al, 0x5a; mov ecx, n; 1: mov [0], al; dec ecx; jnz 1b;
    hlt"""
    return (bytes([0xB8, 0x00, 0xD0, 0x8E, 0xD8, 0xB0, 0x5A, 0x66, 0xB9]) + n.to_bytes(4, "little")
            + bytes([0xA2, 0x00, 0x00, 0x66, 0x49, 0x75, 0xF9, 0xF4]))


class Counter:
    """The MMIO bench device: counts writes."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


def _user_s(who: int) -> float:
    return resource.getrusage(who).ru_utime


def vmrun_rate(n: int, mode: str = "pio") -> tuple[float, float]:
    """Exits per second, and user-space CPU µs per exit (the VMM's own cost: less noisy than
    the rate on a busy host, where the kernel's share of an exit swings)."""
    vm = Vm(0x10000, 1, irqchip=False)
    try:
        dev = Counter()
        if mode == "mmio":
            vm.memory.write(0x1000, mmio_guest_code(n))
            vm.mmio.insert(dev, MMIO_ADDR, 0x1000)
        else:
            vm.memory.write(0x1000, guest_code(n))
        vcpu = vm.vcpus[0]
        s = vcpu.get_sregs()
        s.cs.base = 0
        s.cs.selector = 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rflags = 0x1000, 2
        vcpu.set_regs(r)
        u0, t0 = _user_s(resource.RUSAGE_SELF), time.perf_counter()
        vm.start()
        info = vm.wait(600)
        dt = time.perf_counter() - t0
        user = _user_s(resource.RUSAGE_SELF) - u0
        assert info is not None and info.code == ExitCode.HALT, info
        if mode == "mmio":
            assert dev.writes == n and vm.mmio.unhandled == 0, (dev.writes, vm.mmio.unhandled)
        else:
            assert vm.pio.unhandled == n, vm.pio.unhandled
        return n / dt, user / n * 1e6
    finally:
        vm.close()


def c_rate(binary: Path, n: int, mode: str = "pio") -> tuple[float, float]:
    u0 = _user_s(resource.RUSAGE_CHILDREN)
    out = subprocess.run([str(binary), str(n), mode], check=True, capture_output=True,
                         text=True)
    exits, secs = out.stdout.split()
    assert int(exits) == n, exits
    return int(exits) / float(secs), (_user_s(resource.RUSAGE_CHILDREN) - u0) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as d:
        binary = Path(d) / "kvm_exit_loop"
        subprocess.run(["cc", "-O2", "-o", str(binary), str(HERE / "c" / "kvm_exit_loop.c")],
                       check=True)
        ours: dict[str, list[tuple[float, float]]] = {"pio": [], "mmio": []}
        theirs: dict[str, list[tuple[float, float]]] = {"pio": [], "mmio": []}
        for _ in range(rounds):
            for mode in ("pio", "mmio"):
                theirs[mode].append(c_rate(binary, n, mode))
                ours[mode].append(vmrun_rate(n, mode))
    for mode, label in (("pio", "port"), ("mmio", "MMIO")):
        o = statistics.median(r for r, _ in ours[mode])
        t = statistics.median(r for r, _ in theirs[mode])
        ou = statistics.median(u for _, u in ours[mode])
        tu = statistics.median(u for _, u in theirs[mode])
        print(f"{label} exits: vmrun {o:,.0f}/s  bare C {t:,.0f}/s  ratio {o / t:.2f} "
              f"(goal >= {GOALS[mode]});  user CPU/exit: vmrun {ou:.2f} us, C {tu:.2f} us")


if __name__ == "__main__":
    main()
