"""Benchmark: virtio-blk inside the guest, vmrun against QEMU 7.2 on the same backing file.

Boots the default guest (same vmlinux, initramfs and command line for both VMMs) with a raw
disk; its /init runs ``blkbench`` (vmrun/guest/blkbench.c: O_DIRECT, Linux native AIO — fio's
``--direct=1 --ioengine=libaio``) for:

  - sequential 1 MiB reads and writes, queue depth 1 (SEQ_MIB MiB each);
  - random 4 KiB reads and writes at queue depth 32 (RANDOM_SECS seconds each);

then powers off. vmrun and QEMU run alternately, ROUNDS times each, and the best figure of
each VMM is compared. Goals (issue 3): sequential >= 1.0 x QEMU, random 4 KiB >= 0.5 x QEMU.

Where QEMU cannot reach guest user space (on kvm-pvm it stops with "KVM internal error" at
the kernel's INT3 self-test) the script says so and prints vmrun's figures alone.

Usage: python bench/blk.py [--rounds N] [--random-secs S] [--no-qemu]
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEQ_MIB = 32
DISK_MIB = 256
LINE = re.compile(r"blkbench: (\w+) bs=(\d+) qd=(\d+) ios=(\d+) bytes=(\d+) usecs=(\d+) "
                  r"iops=(\d+) kbps=(\d+)")
TESTS = ("read", "write", "randread", "randwrite")
STOP_AT = ("reboot: Power down", "KVM internal error", "Kernel panic")


def guest_commands(random_secs: int) -> str:
    return (f"blkbench read /dev/vda 1048576 1 {SEQ_MIB}; "
            f"blkbench write /dev/vda 1048576 1 {SEQ_MIB}; "
            f"blkbench randread /dev/vda 4096 32 {random_secs}; "
            f"blkbench randwrite /dev/vda 4096 32 {random_secs}; poweroff -f")


def figures(text: str) -> dict[str, tuple[float, float]]:
    """test -> (MB/s, IOPS) from blkbench's lines."""
    out = {}
    for m in LINE.finditer(text):
        out[m.group(1)] = (int(m.group(8)) / 1000.0, float(m.group(7)))
    return out


def run_until(cmd: list[str], timeout: float) -> str:
    """Run a VMM, returning its console text once the guest powers off, QEMU reports a KVM
    internal error (it then pauses rather than exits), the kernel panics, or time runs out."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    text = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            text += chunk
            if any(s.encode() in text for s in STOP_AT):
                time.sleep(1.0)     # let the VMM print its own last lines
                break
    finally:
        proc.kill()
        proc.wait()
    return text.decode(errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--random-secs", type=int, default=20)
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from vmrun.config import load_machine

    tiny = load_machine(REPO / "machines" / "tiny.toml")
    cmdline = tiny.boot.cmdline + f' run="{guest_commands(args.random_secs)}"'
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:     # /var/tmp: O_DIRECT works
        disk = Path(d) / "disk.img"
        with open(disk, "wb") as f:
            for _ in range(DISK_MIB):
                f.write(b"\xa5" * (1 << 20))
        machine = Path(d) / "blk.toml"
        machine.write_text(f'''name = "blk"
cpus = 1
memory = "256M"
on_reboot = "exit"
[cpu]
profile = "compat"
[boot]
kernel = "{tiny.boot.kernel}"
initrd = "{tiny.boot.initrd}"
cmdline = '{cmdline}'
[devices.disk]
model = "virtio-blk"
path = "{disk}"
nocache = true
''')
        ours: dict[str, list[tuple[float, float]]] = {t: [] for t in TESTS}
        theirs: dict[str, list[tuple[float, float]]] = {t: [] for t in TESTS}
        qemu_note = "not installed" if qemu is None else ""
        for r in range(args.rounds):
            text = run_until([sys.executable, "-m", "vmrun", "up", str(machine)], 3600)
            got = figures(text)
            if not got:
                print("vmrun: no figures; console tail:\n" + text[-2000:])
            for t, v in got.items():
                ours[t].append(v)
            print(f"round {r + 1}: vmrun {got}")
            if qemu and not qemu_note:
                text = run_until([qemu, "-enable-kvm", "-M", "pc", "-nodefaults", "-no-reboot",
                                  "-cpu", "qemu64,-cx16", "-m", "256", "-smp", "1",
                                  "-kernel", str(tiny.boot.kernel), "-initrd",
                                  str(tiny.boot.initrd), "-append", cmdline,
                                  "-serial", "stdio", "-display", "none",
                                  "-drive", f"file={disk},if=none,id=d0,format=raw,cache=none",
                                  "-device", "virtio-blk-pci,drive=d0"], 3600)
                got = figures(text)
                for t, v in got.items():
                    theirs[t].append(v)
                print(f"round {r + 1}: qemu {got}")
                if not got:
                    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-3:]
                    qemu_note = "it did not reach guest user space here: " + " | ".join(tail)
        print(f"\nvirtio-blk, best of {args.rounds} (MB/s; IOPS for random 4 KiB QD32)")
        for t in TESTS:
            best = max(ours[t], default=None)
            q = max(theirs[t], default=None)
            goal = 1.0 if not t.startswith("rand") else 0.5
            ours_s = "-" if best is None else f"{best[0]:.2f} MB/s {best[1]:.0f} IOPS"
            line = f"  {t:10s} vmrun {ours_s}"
            if best and q:
                line += (f"   qemu {q[0]:.2f} MB/s {q[1]:.0f} IOPS   ratio "
                         f"{best[0] / q[0]:.2f} (goal >= {goal})")
            print(line)
        if qemu_note:
            print(f"qemu: no figures ({qemu_note})")


if __name__ == "__main__":
    main()
