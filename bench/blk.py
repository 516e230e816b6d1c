"""Benchmark: virtio-blk, vmrun against QEMU 7.2 on the same guest and the same backing file.

The guest is ``vblk`` (vmrun/testing/native/vblk.c): a small virtio-blk driver that runs in
guest user mode, so it runs at native speed even on a host whose KVM emulates guest kernel
code (kvm-pvm, where Linux cannot even reach user space under QEMU). The same ELF boots under
both VMMs through its PVH note. It does, with O_DIRECT on the host side for both VMMs
(vmrun ``nocache = true``, QEMU ``cache=none``):

  - sequential 1 MiB reads and writes, one in flight, over the whole disk;
  - random 4 KiB reads and writes, 32 in flight (fio's --iodepth=32 --bs=4k).

Each phase sits between "begin NAME" / "end NAME" lines on the debug console (port 0xE9),
timed here as they arrive. vmrun and QEMU run alternately, ROUNDS times each; the best of
each is compared. Goal (issue 7): >= 1.0 x QEMU on all four. vmrun runs with
``huge_pages = true``, as QEMU backs guest RAM with transparent huge pages by default.

``--qcow2`` runs the same four phases on a qcow2 image instead (the raw disk converted by
``qemu-img convert -O qcow2``, so every cluster is allocated; both VMMs open that one file,
QEMU with ``format=qcow2,cache=none``). Goal (issue 12): >= 0.8 x QEMU.

``--device ahci`` runs ``vahci`` (vmrun/testing/native/vahci.c) instead: the same four phases
over an AHCI controller with NCQ (vmrun ``ahci-hd``, QEMU ``-device ahci`` + ``ide-hd``),
sequential 1 MiB with one tag in flight, random 4 KiB with 32.

``--linux`` also runs ``blkbench`` (vmrun/guest/blkbench.c, Linux AIO) inside the default
Linux guest under vmrun; QEMU gets no figure there on kvm-pvm (it stops at the kernel's INT3
self-test), so that part prints vmrun's figures alone.

Usage: python bench/blk.py [--device virtio|ahci] [--rounds N] [--disk-mib N] [--rand-ios N]
                           [--qcow2] [--linux]
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
TESTS = ("read", "write", "randread", "randwrite")
GOALS = {"read": 1.0, "write": 1.0, "randread": 1.0, "randwrite": 1.0}   # issue 7
QCOW2_GOALS = {t: 0.8 for t in TESTS}                                     # issue 12
END = re.compile(rb"end (\w+) ios=(\d+) bytes=(\d+)")
STOP_AT = (b"vblk: done", b"vblk: error", b"vahci: done", b"vahci: error",
           b"reboot: Power down", b"KVM internal error", b"Kernel panic")
GUESTS = {"virtio": "vblk", "ahci": "vahci"}
VMRUN_MODELS = {"virtio": "virtio-blk", "ahci": "ahci-hd"}


def timed_run(cmd: list[str], timeout: float) -> tuple[dict[str, tuple[float, int]], str]:
    """Run a VMM; {test: (seconds, bytes)} from the begin/end lines, timed on arrival."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    text, pending = b"", b""
    begun: dict[str, float] = {}
    results: dict[str, tuple[float, int]] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            now = time.monotonic()
            if not chunk:
                break
            text += chunk
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"begin "):
                    begun[line[6:].decode().strip()] = now
                m = END.search(line)
                if m and m.group(1).decode() in begun:
                    name = m.group(1).decode()
                    results[name] = (now - begun[name], int(m.group(3)))
            if any(s in text for s in STOP_AT):
                break
    finally:
        proc.kill()
        proc.wait()
    return results, text.decode(errors="replace")


def vmrun_cmd(elf: Path, disk: Path, cmdline: str, d: Path,
              device: str = "virtio") -> list[str]:
    machine = d / "vblk.toml"
    # Guest RAM on transparent huge pages, as QEMU has it by default (the native guest runs
    # no Linux user space, the reason vmrun keeps them off on kvm-pvm otherwise).
    machine.write_text(f'''name = "vblk-bench"
cpus = 1
memory = "256M"
huge_pages = true
on_reboot = "exit"
[boot]
kernel = "{elf}"
cmdline = "{cmdline}"
[serial.debugcon]
backend = "stdio"
[devices.disk]
model = "{VMRUN_MODELS[device]}"
path = "{disk}"
nocache = true
''')
    return [sys.executable, "-m", "vmrun", "up", str(machine)]


def qemu_cmd(qemu: str, elf: Path, disk: Path, cmdline: str, fmt: str = "raw",
             device: str = "virtio") -> list[str]:
    if device == "ahci":
        attach = ["-device", "ahci,id=ahci0", "-device", "ide-hd,drive=d0,bus=ahci0.0"]
    else:
        attach = ["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]
    return [qemu, "-enable-kvm", "-M", "pc", "-nodefaults", "-no-reboot", "-display", "none",
            "-cpu", "qemu64,-cx16", "-m", "256", "-kernel", str(elf), "-append", cmdline,
            "-chardev", "stdio,id=dbg", "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
            "-drive", f"file={disk},if=none,id=d0,format={fmt},cache=none", *attach]


def figure(test: str, r: tuple[float, int]) -> float:
    """MB/s for sequential tests, IOPS for random ones."""
    secs, nbytes = r
    return nbytes / secs / 1e6 if not test.startswith("rand") else nbytes / 4096 / secs


def native_bench(args: argparse.Namespace, fmt: str = "raw") -> None:
    from vmrun.testing import native

    guest = GUESTS[args.device]
    elf = native.build(guest)
    qemu = shutil.which("qemu-system-x86_64")
    cmdline = f"seq_mib={args.disk_mib} rand_ios={args.rand_ios} qd=32"
    ours: dict[str, list[float]] = {t: [] for t in TESTS}
    theirs: dict[str, list[float]] = {t: [] for t in TESTS}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:      # /var/tmp: O_DIRECT works
        disk = Path(d) / "disk.img"
        with open(disk, "wb") as f:
            for _ in range(args.disk_mib):
                f.write(b"\xa5" * (1 << 20))
        if fmt == "qcow2":
            raw, disk = disk, Path(d) / "disk.qcow2"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                            str(disk)], check=True)
            raw.unlink()
        for r in range(args.rounds):
            runs = [("vmrun", vmrun_cmd(elf, disk, cmdline, Path(d), args.device), ours)]
            if qemu:
                runs.append(("qemu", qemu_cmd(qemu, elf, disk, cmdline, fmt, args.device),
                             theirs))
            for name, cmd, into in runs:
                res, text = timed_run(cmd, 1800)
                if f"{guest}: done" not in text:
                    print(f"round {r + 1}: {name} did not finish: {text.strip()[-300:]}")
                for t, v in res.items():
                    into[t].append(figure(t, v))
                print(f"round {r + 1}: {name:5s} " + "  ".join(
                    f"{t} {figure(t, v):.1f}" for t, v in res.items()), flush=True)
    goals = QCOW2_GOALS if fmt == "qcow2" else GOALS
    print(f"\n{VMRUN_MODELS[args.device]}, native guest {guest}, {fmt} image, best of "
          f"{args.rounds} "
          f"(sequential 1 MiB QD1: MB/s; random 4 KiB QD32: IOPS)")
    for t in TESTS:
        a, b = max(ours[t], default=0.0), max(theirs[t], default=0.0)
        unit = "IOPS" if t.startswith("rand") else "MB/s"
        line = f"  {t:10s} vmrun {a:10.1f} {unit}"
        if b:
            line += f"   qemu {b:10.1f} {unit}   ratio {a / b:.2f} (goal >= {goals[t]})"
        print(line)
    if not qemu:
        print("qemu-system-x86_64 is not installed: no ratio")


def linux_bench(random_secs: int) -> None:
    """blkbench inside the default Linux guest, under vmrun only."""
    from vmrun.config import load_machine

    tiny = load_machine(REPO / "machines" / "tiny.toml")
    run = (f"blkbench read /dev/vda 1048576 1 32; blkbench write /dev/vda 1048576 1 32; "
           f"blkbench randread /dev/vda 4096 32 {random_secs}; "
           f"blkbench randwrite /dev/vda 4096 32 {random_secs}; poweroff -f")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        disk = Path(d) / "disk.img"
        disk.write_bytes(b"\xa5" * (64 << 20))
        machine = Path(d) / "linux.toml"
        machine.write_text(f'''name = "blk-linux"
cpus = 1
memory = "256M"
on_reboot = "exit"
[cpu]
profile = "compat"
[boot]
kernel = "{tiny.boot.kernel}"
initrd = "{tiny.boot.initrd}"
cmdline = '{tiny.boot.cmdline} run="{run}"'
[devices.disk]
model = "virtio-blk"
path = "{disk}"
nocache = true
''')
        out = subprocess.run([sys.executable, "-m", "vmrun", "up", str(machine)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=3600)
    print("\nvirtio-blk, Linux guest (blkbench, Linux AIO, O_DIRECT), vmrun only:")
    for m in re.finditer(r"blkbench: (\w+) bs=(\d+) qd=(\d+) .*iops=(\d+) kbps=(\d+)",
                         out.stdout):
        print(f"  {m.group(1):10s} bs={m.group(2)} qd={m.group(3)}: {m.group(4)} IOPS, "
              f"{int(m.group(5)) / 1000:.2f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=sorted(GUESTS), default="virtio",
                    help="virtio-blk (vblk) or AHCI with NCQ (vahci)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--rand-ios", type=int, default=20000)
    ap.add_argument("--qcow2", action="store_true",
                    help="a qcow2 image (both VMMs) instead of a raw one")
    ap.add_argument("--linux", action="store_true", help="also blkbench in the Linux guest")
    ap.add_argument("--random-secs", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    native_bench(args, "qcow2" if args.qcow2 else "raw")
    if args.linux:
        linux_bench(args.random_secs)


if __name__ == "__main__":
    main()
