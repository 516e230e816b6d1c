"""Benchmark: virtio-net, vmrun against QEMU 7.2 on the same guest and the same backend.

The guest is ``vnet`` (vmrun/testing/native/vnet.c): a polling virtio-net driver in guest
user mode (so it runs at native speed where KVM emulates guest kernel code), booted through
its PVH note under both VMMs. Both connect their NIC to this script over a unix stream socket
with QEMU's framing (vmrun ``backend = "socket"``, QEMU ``-netdev stream``); the script is the
sink (TX tests: it reads and counts) or the source (RX tests: it writes frames as fast as the
socket takes them; both VMMs stop reading while the guest has no buffers posted).

  - tx64 / rx64: 64-byte frames, packets per second;
  - tx1500 / rx1500: 1500-byte frames, MB/s.

Each test is timed here between the guest's "begin NAME" and "end NAME" lines on the debug
console. vmrun and QEMU run alternately, ROUNDS times each; the best of each is compared.
Goal (issue 11): >= 1.0 x QEMU. Each run also reports the CPU time the VMM spent outside
its vCPU threads per frame (the device side; the vCPU threads are the ones found inside
ioctl(KVM_RUN)): on a busy host, where the rate depends on how much CPU the VMM gets, that
is the like-for-like figure. vmrun runs with ``huge_pages = true`` as QEMU's RAM has
transparent huge pages by default.

Usage: python bench/net.py [--rounds N] [--frames N]
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = (("tx", 64), ("rx", 64), ("tx", 1500), ("rx", 1500))
END = re.compile(rb"end (\w+) frames=(\d+) bytes=(\d+)")
STOP_AT = (b"vnet: done", b"vnet: error", b"KVM internal error")


class Peer(threading.Thread):
    """The host end of the link: accept one VMM, then sink (tx) or source (rx)."""

    def __init__(self, path: Path, mode: str, size: int) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.mode, self.size = mode, size
        self.received = 0
        self.stop = False

    def run(self) -> None:
        conn, _ = self.srv.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        try:
            if self.mode == "tx":
                buf = bytearray(1 << 20)
                while not self.stop:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    self.received += n
            else:
                frame = b"\xff" * 6 + b"\x02\0\0\0\0\x09" + b"\x88\xb5" + \
                    bytes(self.size - 14)
                chunk = (struct.pack(">I", len(frame)) + frame) * max(1, 65536 // (
                    len(frame) + 4))
                while not self.stop:
                    conn.sendall(chunk)
        except OSError:
            pass
        finally:
            conn.close()
            self.srv.close()


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (utime + stime)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
            except OSError:
                pass
    except OSError:
        pass
    return out


KVM_RUN = "0xae80"


def vcpu_threads(pid: int) -> set[int]:
    """The threads of ``pid`` found inside ioctl(fd, KVM_RUN) (/proc/PID/task/TID/syscall:
    number 16, second argument KVM_RUN) in quick looks: the vCPUs, under either VMM. A vCPU
    that is on a CPU reads as "running", so it takes looks until one is caught off it; the
    KVM's own kernel thread in the process (kvm-nx-lpage-recovery, started from the first
    KVM_RUN) reads as that same ioctl and must not count."""
    found: set[int] = set()
    for _ in range(200):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        if f.read().startswith("kvm-"):
                            continue
                    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                        fields = f.read().split()
                    if len(fields) > 2 and fields[0] == "16" and fields[2] == KVM_RUN:
                        found.add(int(tid))
                except OSError:
                    pass
        except OSError:
            break
        if found:
            break
        time.sleep(0.005)
    return found


def device_cpu(before: dict[int, float], after: dict[int, float], vcpus: set[int]) -> float:
    """CPU the VMM spent outside its vCPU threads (which poll the rings in guest user mode
    the whole time, under either VMM); without a vCPU found, all but the busiest thread."""
    deltas = {t: after[t] - before.get(t, 0.0) for t in after}
    if vcpus & set(deltas):
        return sum(v for t, v in deltas.items() if t not in vcpus)
    ordered = sorted(deltas.values())
    return sum(ordered[:-1]) if ordered else 0.0


def timed_run(cmd: list[str], timeout: float) -> tuple[dict[str, tuple[float, int, int]], str]:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    text, pending = b"", b""
    begun: dict[str, float] = {}
    cpu0: dict[int, float] = {}
    vcpus: set[int] = set()
    results: dict[str, tuple[float, int, int]] = {}
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
                    cpu0 = thread_cpu(proc.pid)
                    vcpus = vcpus or vcpu_threads(proc.pid)
                m = END.search(line)
                if m and m.group(1).decode() in begun:
                    name = m.group(1).decode()
                    results[name] = (now - begun[name], int(m.group(2)), int(m.group(3)),
                                     device_cpu(cpu0, thread_cpu(proc.pid), vcpus))
            if any(s in text for s in STOP_AT):
                break
    finally:
        proc.kill()
        proc.wait()
    return results, text.decode(errors="replace")


def vmrun_cmd(elf: Path, sock: Path, cmdline: str, d: Path) -> list[str]:
    machine = d / "vnet.toml"
    machine.write_text(f'''name = "vnet-bench"
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
model = "virtio-net"
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
            "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,mac=02:00:00:00:00:01"]


def one(name: str, make_cmd, d: Path, direction: str, size: int, frames: int,
        ) -> tuple[float, int, float] | None:
    sock = d / f"{name}-{direction}{size}.sock"
    sock.unlink(missing_ok=True)
    peer = Peer(sock, direction, size)
    peer.start()
    cmdline = f"tests={direction[0]} count={frames} size={size}"
    res, text = timed_run(make_cmd(sock, cmdline), 600)
    peer.stop = True
    if "vnet: done" not in text or direction not in res:
        print(f"  {name} {direction}{size} did not finish: {text.strip()[-300:]}")
        return None
    secs, n, nbytes, cpu = res[direction]
    if direction == "tx" and peer.received < n * (size + 4) * 0.99:
        print(f"  {name} tx{size}: the sink got {peer.received} bytes for {n} frames")
    return secs, n, cpu


def figure(size: int, secs: float, n: int) -> float:
    """packets/s for 64-byte frames, MB/s for 1500-byte ones."""
    return n / secs if size == 64 else n * size / secs / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=200000)
    ap.add_argument("--only", default="", help="comma-separated subset, e.g. tx64,rx1500")
    args = ap.parse_args()
    tests = [(t, s) for t, s in TESTS if not args.only or f"{t}{s}" in args.only.split(",")]
    sys.path.insert(0, str(REPO))
    from vmrun.testing import native

    elf = native.build("vnet")
    qemu = shutil.which("qemu-system-x86_64")
    ours: dict[str, list[float]] = {f"{t}{s}": [] for t, s in TESTS}
    theirs: dict[str, list[float]] = {f"{t}{s}": [] for t, s in TESTS}
    cpu: dict[str, dict[str, list[float]]] = {"vmrun": {}, "qemu": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for r in range(args.rounds):
            for direction, size in tests:
                key = f"{direction}{size}"
                runs = [("vmrun", lambda s, c: vmrun_cmd(elf, s, c, d), ours)]
                if qemu:
                    runs.append(("qemu", lambda s, c: qemu_cmd(qemu, elf, s, c), theirs))
                for name, mk, into in runs:
                    out = one(name, mk, d, direction, size, args.frames)
                    if out is not None:
                        secs, n, used = out
                        into[key].append(figure(size, secs, n))
                        cpu[name].setdefault(key, []).append(used / n * 1e6)
                        print(f"round {r + 1}: {name:5s} {key:7s} "
                              f"{figure(size, secs, n):12.1f}   device CPU "
                              f"{used / n * 1e6:6.2f} us/frame", flush=True)
    print(f"\nvirtio-net, native guest, socket backend, best of {args.rounds} "
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
