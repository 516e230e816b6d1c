"""Benchmark: the fbuf VNC server's cost per framebuffer update (vmrun side only).

A fake guest draws into the framebuffer (FakeVm: the same device, frame tracker and server a
boot uses) and a client on a loopback socket asks for an update after every frame, with the
refresh timer at 1 kHz so it is not the limit: each round is one change, one refresh, one
encoded update, received and decoded (by the test client, in Python: part of the time).
Two workloads at 1024x768: a full-screen change (alternating frames of coloured bands, as a
desktop redraw) and a small one (one 8x16-glyph text line changes), each with Raw and with
ZRLE. Reported: updates per second and bytes per update.

Not compared with QEMU: that needs a guest drawing the same frames under both VMMs (a native
test guest for bochs-display), which does not exist yet.
Usage: python bench/fbuf.py [seconds per case]
"""

from __future__ import annotations

import struct
import sys
import time

from vmrun_fbuf_vnc import encodings as enc
from vmrun_fbuf_vnc import rfb
from vmrun_fbuf_vnc.client import RfbClient

from plugins.fbuf_vnc.tests.fbufrig import Rig

rfb.REFRESH_HZ = 1000          # look for changes as often as the client asks


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


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    print(f"{'workload':<10} {'encoding':<8} {'updates/s':>10} {'bytes/update':>13}")
    for kind in ("full", "line"):
        for name, e in (("Raw", enc.RAW), ("ZRLE", enc.ZRLE)):
            ups, bpu = run(kind, e, seconds)
            print(f"{kind:<10} {name:<8} {ups:>10.1f} {bpu:>13.0f}")


if __name__ == "__main__":
    main()
