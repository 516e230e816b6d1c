"""Benchmark: the fbuf VNC server's cost per framebuffer update (vmrun side only).

A fake guest draws into the framebuffer (FakeVm: the same device, frame tracker and server a
boot uses) and a client on a loopback socket asks for an update after every frame, with the
refresh timer at 1 kHz so it is not the limit: each round is one change, one refresh, one
encoded update, received and decoded (by the test client, in Python: part of the time).
Two workloads at 1024x768: a full-screen change (alternating frames of coloured bands, as a
desktop redraw) and a small one (one 8x16-glyph text line changes), each with Raw and with
ZRLE. Reported: updates per second and bytes per update.

``--native``: the same two workloads drawn by a guest (``vmrun/testing/native/vfb.c``, in
guest user mode so it runs at native speed here) into the real device, under vmrun and under
QEMU 7.2 (``-device bochs-display -vnc``), and a client that asks for one incremental update
after another for a few seconds and counts them (payloads skipped, not decoded): updates per
second, bytes per update, the VMM's CPU time per update outside its vCPU thread ("ms CPU":
the guest draws flat out, so its vCPU is busy under either VMM), and the ratio vmrun/QEMU.
Both VMMs look at the frame every 30 ms while a client waits, so ~33 updates/s is the most
either delivers here; the CPU per update says what each spends to keep that rate.
Usage: python bench/fbuf.py [--native] [seconds per case]
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmrun_fbuf_vnc import encodings as enc
from vmrun_fbuf_vnc import rfb
from vmrun_fbuf_vnc.client import RfbClient

from plugins.fbuf_vnc.tests.fbufrig import Rig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import net as netbench  # noqa: E402  (bench/net.py: the VMM's CPU outside its vCPU threads)

rfb.REFRESH_INTERVAL = 0.001   # look for changes as often as the client asks


def frames(kind: str):
    """Yield functions that draw frame i on the rig."""
    band = [struct.pack("<I", c) * 1024 for c in (0x203040, 0xC08020, 0x10A0F0, 0xFFFFFF)]

    def full(rig: Rig, i: int) -> None:
        for y in range(0, 768, 48):
            row = band[(i + y // 48) % 4]
            for r in range(y, y + 48):
                rig.put(0, r, row)

    def line(rig: Rig, i: int) -> None:
        glyph = struct.pack("<I", 0x010101 * (20 + i % 200)) * 8 + bytes(4 * 8)
        y = 16 * (i % 40)
        for r in range(y, y + 16):
            rig.put(0, r, (glyph if (r + i) % 2 else bytes(64)) * 60)

    return full if kind == "full" else line


def run(kind: str, encoding: int, seconds: float) -> tuple[float, float]:
    rig = Rig()
    try:
        rig.set_mode(1024, 768)
        draw = frames(kind)
        c = RfbClient(rig.address)
        c.handshake()
        c.set_encodings([encoding])
        c.request(incremental=False)
        c.read_update()
        n = 0
        sent0 = rig.server.bytes_sent
        end = time.monotonic() + seconds
        t0 = time.monotonic()
        while time.monotonic() < end:
            draw(rig, n + 1)
            c.request(incremental=True)
            c.read_update()
            n += 1
        dt = time.monotonic() - t0
        c.close()
        return n / dt, (rig.server.bytes_sent - sent0) / max(n, 1)
    finally:
        rig.close()


# -- the native guest under vmrun and QEMU ------------------------------------------------
def _recv(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


def count_updates(port: int, encoding: int, seconds: float,
                  pid: int | None = None) -> tuple[float, float, float]:
    """Updates per second, bytes per update and (with the VMM's ``pid``) the VMM's CPU
    seconds outside its vCPU threads per update, for an RFB 3.8 client that asks for the
    next incremental update as soon as one has arrived."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        _recv(s, 12)
        s.sendall(b"RFB 003.008\n")
        n = _recv(s, 1)[0]
        types = _recv(s, n)
        assert 1 in types, types
        s.sendall(b"\x01")
        assert _recv(s, 4) == b"\0\0\0\0"
        s.sendall(b"\x01")
        w, h = struct.unpack(">HH", _recv(s, 4))
        _recv(s, 16)
        _recv(s, struct.unpack(">I", _recv(s, 4))[0])
        s.sendall(struct.pack(">BxHi", 2, 1, encoding))
        s.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
        vcpus = netbench.vcpu_threads(pid) if pid is not None else set()
        count = total = 0
        t0 = None
        end = time.monotonic() + seconds + 2
        while time.monotonic() < end:
            head = _recv(s, 1)
            if head[0] != 0:
                raise AssertionError(f"server message {head[0]}")
            nrects = struct.unpack(">xH", _recv(s, 3))[0]
            size = 4
            for _ in range(nrects):
                x, y, rw, rh, e = struct.unpack(">HHHHi", _recv(s, 12))
                size += 12
                if e == 0:
                    _recv(s, rw * rh * 4)
                    size += rw * rh * 4
                elif e in (16, 6):
                    n = struct.unpack(">I", _recv(s, 4))[0]
                    _recv(s, n)
                    size += 4 + n
                elif e == 1:
                    _recv(s, 4)
                    size += 4
                elif e == -308:
                    body = _recv(s, 4)
                    _recv(s, 16 * body[0])
                elif e != -223:
                    raise AssertionError(f"encoding {e}")
            s.sendall(struct.pack(">BBHHHH", 3, 1, 0, 0, w, h))
            if t0 is None:
                t0 = time.monotonic()              # the first (full) update does not count
                end = t0 + seconds
                if pid is not None:
                    cpu0 = netbench.thread_cpu(pid)
                continue
            count += 1
            total += size
        dt = time.monotonic() - (t0 or time.monotonic())
        cpu = 0.0
        if pid is not None and t0 is not None:
            cpu = netbench.device_cpu(cpu0, netbench.thread_cpu(pid), vcpus)
        return count / max(dt, 1e-9), total / max(count, 1), cpu / max(count, 1)
    finally:
        s.close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start(cmd: list[str], ready: bytes, timeout: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    end = time.monotonic() + timeout
    while ready not in out:
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"{cmd[0]} did not start: {out[-2000:]!r}")
        out += proc.stdout.read1(4096)
    return proc


def native(seconds: float) -> None:
    from vmrun.testing import native as guests

    elf = guests.build("vfb")
    qemu = shutil.which("qemu-system-x86_64")
    d = Path(tempfile.mkdtemp(prefix="vmrun-fbuf-bench-"))
    results: dict[tuple[str, str, str], tuple[float, float, float]] = {}
    for work in ("full", "line"):
        cmdline = f"w=1024 h=768 work={work}"
        port = _free_port()
        machine = d / f"vfb-{work}.toml"
        machine.write_text(f'''name = "vfb-bench"
cpus = 1
memory = "32M"
huge_pages = true
on_reboot = "exit"
[boot]
kernel = "{elf}"
cmdline = "{cmdline}"
[serial.debugcon]
backend = "stdio"
[devices.fb]
model = "fbuf"
listen = "127.0.0.1:{port}"
''')
        runs = [("vmrun", [sys.executable, "-m", "vmrun", "up", str(machine)], port)]
        if qemu:
            qport = _free_port()
            while qport < 5900:
                qport = _free_port()
            runs.append(("qemu", [qemu, "-enable-kvm", "-M", "pc", "-nodefaults",
                                  "-no-reboot", "-vnc", f"127.0.0.1:{qport - 5900}", "-cpu",
                                  "qemu64,-cx16", "-m", "32", "-kernel", str(elf), "-append",
                                  cmdline, "-chardev", "stdio,id=dbg", "-device",
                                  "isa-debugcon,iobase=0xe9,chardev=dbg", "-device",
                                  "bochs-display"], qport))
        for who, cmd, p in runs:
            proc = _start(cmd, b"vfb: ready")
            try:
                time.sleep(1)
                for name, e in (("Raw", enc.RAW), ("ZRLE", enc.ZRLE)):
                    results[(work, name, who)] = count_updates(p, e, seconds, proc.pid)
            finally:
                proc.kill()
                proc.wait()
    print(f"{'workload':<6} {'enc':<5} {'vmrun upd/s':>11} {'B/upd':>9} {'ms CPU':>6} "
          f"{'qemu upd/s':>10} {'B/upd':>9} {'ms CPU':>6} {'ratio':>6}")
    for work in ("full", "line"):
        for name in ("Raw", "ZRLE"):
            a = results[(work, name, "vmrun")]
            b = results.get((work, name, "qemu"))
            line = f"{work:<6} {name:<5} {a[0]:>11.1f} {a[1]:>9.0f} {a[2] * 1e3:>6.2f}"
            if b:
                ratio = a[0] / b[0] if b[0] else float("inf")
                line += f" {b[0]:>10.1f} {b[1]:>9.0f} {b[2] * 1e3:>6.2f} {ratio:>6.2f}"
            print(line)
    if not qemu:
        print("qemu-system-x86_64 is not installed: no ratio")


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--native"]
    seconds = float(args[0]) if args else 5.0
    if "--native" in sys.argv:
        native(seconds)
        return
    print(f"{'workload':<10} {'encoding':<8} {'updates/s':>10} {'bytes/update':>13}")
    for kind in ("full", "line"):
        for name, e in (("Raw", enc.RAW), ("ZRLE", enc.ZRLE)):
            ups, bpu = run(kind, e, seconds)
            print(f"{kind:<10} {name:<8} {ups:>10.1f} {bpu:>13.0f}")


if __name__ == "__main__":
    main()
