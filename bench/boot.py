"""Benchmark: time from process start to the guest's init, vmrun vs QEMU, same kernel and disk.

Both boot the default guest's vmlinux (PVH), initramfs, command line and memory size; runs
alternate. The finish line is the first of: the init's boot marker (vmrun's port 0xF5, written
by the guest's /init through /dev/port), or the kernel's "Run /init" line on the serial console
(where guest user space cannot run, that line is the last common milestone). Goal: vmrun <=
0.8 x QEMU. Also prints vmrun's memory overhead: RSS of the vmrun process minus guest RAM
touched, sampled at the finish line (goal <= 40 MiB).

Usage: python bench/boot.py [rounds]
"""

from __future__ import annotations

import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FINISH = re.compile(rb"Run /init|vmrun-init: user space is up")
TIMEOUT_S = 900


def tiny_files() -> tuple[Path, Path, str, int]:
    sys.path.insert(0, str(REPO))
    from vmrun.config import load_machine

    cfg = load_machine(REPO / "machines" / "tiny.toml")
    assert cfg.boot.initrd is not None
    return cfg.boot.kernel, cfg.boot.initrd, cfg.boot.cmdline, cfg.memory


def watch(cmd: list[str], log: Path, rss_pid: bool = False) -> tuple[float | None, float | None]:
    """Run ``cmd`` with its console on stdout until FINISH shows; (seconds, overhead MiB)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    buf = b""
    elapsed = None
    overhead = None
    try:
        while time.monotonic() - t0 < TIMEOUT_S:
            r, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not r:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if b"KVM internal error" in buf:
                break          # QEMU pauses on it and never gets further
            if FINISH.search(buf):
                elapsed = time.monotonic() - t0
                if rss_pid:
                    overhead = vmm_overhead_mib(proc.pid)
                break
    finally:
        proc.kill()
        proc.wait()
        log.write_bytes(buf)
    return elapsed, overhead


def vmm_overhead_mib(pid: int) -> float:
    """RSS minus the resident part of guest RAM (the largest anonymous mappings)."""
    rss = 0
    guest = 0
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0].isdigit() or line[0] in "abcdef":
                size = 0
                continue
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:"):
                kb = int(line.split()[1])
                rss += kb
                if size >= 64 * 1024:       # guest RAM slots are the only mappings this big
                    guest += kb
    return (rss - guest) / 1024


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    kernel, initrd, cmdline, memory = tiny_files()
    qemu = shutil.which("qemu-system-x86_64")
    ours, theirs, overheads = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(rounds):
            if qemu:
                t, _ = watch([qemu, "-enable-kvm", "-M", "pc", "-nodefaults", "-no-reboot",
                              "-cpu", "qemu64,-cx16", "-m", str(memory >> 20), "-kernel",
                              str(kernel), "-initrd", str(initrd), "-append", cmdline,
                              "-serial", "stdio", "-display", "none"], Path(d) / f"qemu{i}.log")
                theirs.append(t)
                print(f"round {i}: qemu {f'{t:.1f}s' if t else 'did not reach init'}")
                if t is None:
                    tail = (Path(d) / f"qemu{i}.log").read_bytes()[-300:].decode(errors="replace")
                    print(f"  qemu's last output: {tail.strip().splitlines()[-1:]}")
            t, ov = watch([sys.executable, "-m", "vmrun", "up", str(REPO / "machines" /
                                                                    "tiny.toml")],
                          Path(d) / f"vmrun{i}.log", rss_pid=True)
            ours.append(t)
            if ov is not None:
                overheads.append(ov)
            shown = f"{t:.1f}s" if t else "did not reach init"
            extra = f"  VMM overhead {ov:.1f} MiB" if ov is not None else ""
            print(f"round {i}: vmrun {shown}{extra}")
    good_ours = [t for t in ours if t]
    good_theirs = [t for t in theirs if t]
    if good_ours:
        print(f"boot: vmrun median {statistics.median(good_ours):.1f}s")
    if good_ours and good_theirs:
        ratio = statistics.median(good_ours) / statistics.median(good_theirs)
        print(f"boot: qemu median {statistics.median(good_theirs):.1f}s  ratio {ratio:.2f} "
              "(goal <= 0.8)")
    elif qemu:
        print("boot: no ratio: QEMU did not reach init on this host (see its last output)")
    if overheads:
        print(f"memory: VMM overhead {max(overheads):.1f} MiB (goal <= 40)")


if __name__ == "__main__":
    main()
