"""Benchmark: the e1000, vmrun against QEMU 7.2 (``-device e1000-82545em``,
the 8086:100F flavour of its e1000) on the same guest and the
same socket backend.

The guest is the native ``e1000`` one (vmrun/testing/native/e1000.c): a polling 8254x driver
in guest user mode with legacy rings of 256 descriptors. The host end of the link, the
timing and the figures are bench/net.py's (a unix stream socket with QEMU's framing, the
script as sink or source; vmrun ``backend = "socket"``, QEMU ``-netdev stream``):

  - tx64 / rx64: 64-byte frames, packets per second;
  - tx1500 / rx1500: 1500-byte frames, MB/s.

Transmit figures count the frames that reached the host: QEMU's e1000 drops frames when the
socket is full (its guest still sees them done), vmrun's holds them until there is room.

vmrun and QEMU run alternately, ROUNDS times each; the best of each is compared. Goal
(issue 11): >= 1.0 x QEMU. As bench/net.py does, it also reports the CPU each VMM spent per
frame outside its vCPU thread (the device's work), steadier than rates on a busy host.

Usage: python bench/e1000.py [--rounds N] [--frames N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import net as netbench  # noqa: E402  (bench/net.py: the peer, the timing, the figures)

TESTS = netbench.TESTS


def vmrun_cmd(elf: Path, sock: Path, cmdline: str, d: Path) -> list[str]:
    machine = d / "e1000.toml"
    machine.write_text(f'''name = "e1000-bench"
cpus = 1
memory = "256M"
huge_pages = true
on_reboot = "exit"
[boot]
kernel = "{elf}"
cmdline = "{cmdline}"
[serial.debugcon]
backend = "stdio"
[devices.net]
model = "e1000"
backend = "socket"
connect = "{sock}"
''')
    return [sys.executable, "-m", "vmrun", "up", str(machine)]


def qemu_cmd(qemu: str, elf: Path, sock: Path, cmdline: str) -> list[str]:
    return [qemu, "-enable-kvm", "-M", "pc", "-nodefaults", "-no-reboot", "-display", "none",
            "-cpu", "qemu64,-cx16", "-m", "256", "-kernel", str(elf), "-append", cmdline,
            "-chardev", "stdio,id=dbg", "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
            "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
            "-device", "e1000-82545em,netdev=n0,mac=02:00:00:00:00:01"]


def one(name: str, make_cmd, d: Path, direction: str, size: int, frames: int,
        timeout: float = 600) -> tuple[float, int, float] | None:
    """One VMM, one test: (seconds, frames, device CPU seconds), or None when it did not
    finish."""
    sock = d / f"{name}-{direction}{size}.sock"
    sock.unlink(missing_ok=True)
    peer = netbench.Peer(sock, direction, size)
    peer.start()
    # rdt_every=1: QEMU 7.2's e1000 stops receiving for good once its ring has filled when
    # the driver hands buffers back several at a time (measured here); both VMMs get the
    # same guest, which gives each buffer back as soon as it is used.
    extra = " rdt_every=1" if direction == "rx" else ""
    res, text = netbench.timed_run(make_cmd(sock, f"tests={direction[0]} count={frames} "
                                                  f"size={size}{extra}"), timeout)
    if "e1000: done" not in text or direction not in res:
        peer.stop = True
        print(f"  {name} {direction}{size} did not finish: {text.strip()[-300:]}")
        return None
    secs, n, _nbytes, cpu = res[direction]
    if direction == "tx":
        # Count what reached the host: a VMM that drops frames when the socket is full
        # (QEMU's e1000 does) must not get credit for them.
        time.sleep(0.3)
        delivered = peer.received // (size + 4)
        if delivered < n:
            print(f"  {name} tx{size}: {n - delivered} of {n} frames never reached the host")
            n = delivered
    peer.stop = True
    return secs, n, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=100000)
    ap.add_argument("--only", default="", help="e.g. tx64,rx1500")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from vmrun.testing import native

    elf = native.build("e1000")
    qemu = shutil.which("qemu-system-x86_64")
    tests = [(t, s) for t, s in TESTS if not args.only or f"{t}{s}" in args.only.split(",")]
    ours: dict[str, list[float]] = {f"{t}{s}": [] for t, s in tests}
    theirs: dict[str, list[float]] = {f"{t}{s}": [] for t, s in tests}
    cpu: dict[str, dict[str, list[float]]] = {"vmrun": {}, "qemu": {}}
    netbench.STOP_AT = (b"e1000: done", b"e1000: error", b"KVM internal error")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for r in range(args.rounds):
            for direction, size in tests:
                key = f"{direction}{size}"
                runs = [("vmrun", lambda s, c: vmrun_cmd(elf, s, c, d), ours)]
                if qemu:
                    runs.append(("qemu", lambda s, c: qemu_cmd(qemu, elf, s, c), theirs))
                for name, mk, into in runs:
                    out = one(name, mk, d, direction, size, args.frames, args.timeout)
                    if out is not None and out[1]:
                        secs, n, used = out
                        into[key].append(netbench.figure(size, secs, n))
                        cpu[name].setdefault(key, []).append(used / n * 1e6)
                        print(f"round {r + 1}: {name:5s} {key:7s} "
                              f"{netbench.figure(size, secs, n):12.1f}   device CPU "
                              f"{used / n * 1e6:6.2f} us/frame", flush=True)
    print(f"\ne1000, native guest, socket backend, best of {args.rounds} "
          f"({args.frames} frames; 64-byte: packets/s, 1500-byte: MB/s)")
    for direction, size in tests:
        key = f"{direction}{size}"
        a, b = max(ours[key], default=0.0), max(theirs[key], default=0.0)
        unit = "pps" if size == 64 else "MB/s"
        line = f"  {key:7s} vmrun {a:12.1f} {unit}"
        if b:
            line += f"   qemu {b:12.1f} {unit}   ratio {a / b:.2f} (goal >= 1.0)"
        ca = min(cpu["vmrun"].get(key, [0.0]))
        cb = min(cpu["qemu"].get(key, [0.0]))
        line += f"   device CPU/frame vmrun {ca:.2f} us, qemu {cb:.2f} us"
        print(line)


if __name__ == "__main__":
    main()
