"""Benchmark: vmrun's I/O-port exit rate against a bare C KVM loop on the same guest.

Both run a real-mode guest doing N `out`s to an unused port, then `hlt`; runs alternate.
Goal: vmrun >= 0.85 x the C loop. Usage: python bench/exit_rate.py [N] [rounds]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmrun.core.exits import ExitCode
from vmrun.core.vm import Vm

HERE = Path(__file__).parent


def guest_code(n: int) -> bytes:
    return bytes([0x66, 0xB9]) + n.to_bytes(4, "little") + bytes(
        [0xE6, 0x10, 0x66, 0x49, 0x75, 0xFA, 0xF4])


def vmrun_rate(n: int) -> float:
    vm = Vm(0x10000, 1, irqchip=False)
    try:
        vm.memory.write(0x1000, guest_code(n))
        vcpu = vm.vcpus[0]
        s = vcpu.get_sregs()
        s.cs.base = 0
        s.cs.selector = 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rflags = 0x1000, 2
        vcpu.set_regs(r)
        t0 = time.perf_counter()
        vm.start()
        info = vm.wait(600)
        dt = time.perf_counter() - t0
        assert info is not None and info.code == ExitCode.HALT, info
        assert vm.pio.unhandled == n, vm.pio.unhandled
        return n / dt
    finally:
        vm.close()


def c_rate(binary: Path, n: int) -> float:
    out = subprocess.run([str(binary), str(n)], check=True, capture_output=True, text=True)
    exits, secs = out.stdout.split()
    return int(exits) / float(secs)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as d:
        binary = Path(d) / "kvm_exit_loop"
        subprocess.run(["cc", "-O2", "-o", str(binary), str(HERE / "c" / "kvm_exit_loop.c")],
                       check=True)
        ours, theirs = [], []
        for _ in range(rounds):
            theirs.append(c_rate(binary, n))
            ours.append(vmrun_rate(n))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"exits: vmrun {o:,.0f}/s  bare C {t:,.0f}/s  ratio {o / t:.2f} (goal >= 0.85)")


if __name__ == "__main__":
    main()
