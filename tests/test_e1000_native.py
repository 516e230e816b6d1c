"""The native ``e1000`` guest (vmrun/testing/native/e1000.c) through vmrun's e1000 on a
socket link: it resets the card, checks the EEPROM, then sends and receives frames; the test
is the host end of the link and checks what crossed it."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm
FRAMES = 3000


def _run(tmp: Path, tests: str, size: int, source: bool) -> tuple[str, bytes]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm on this host")
    from vmrun.testing import native

    elf = native.build("e1000")
    path = tmp / "link.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    got = bytearray()
    stop = threading.Event()

    def peer() -> None:
        conn, _ = srv.accept()
        conn.settimeout(0.5)
        frame = b"\xff" * 6 + b"\x02\0\0\0\0\x09" + b"\x88\xb5" + bytes(range(size - 14))
        chunk = (struct.pack(">I", len(frame)) + frame) * 32
        while not stop.is_set():
            try:
                if source:
                    conn.sendall(chunk)
                else:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    got.extend(data)
            except (TimeoutError, OSError):
                if stop.is_set():
                    break
        conn.close()

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    machine = tmp / "e1000.toml"
    machine.write_text(f'''name = "e1000-native"
cpus = 1
memory = "64M"
on_reboot = "exit"
[boot]
kernel = "{elf}"
cmdline = "tests={tests} count={FRAMES} size={size}"
[serial.debugcon]
backend = "stdio"
[devices.net]
model = "e1000"
backend = "socket"
connect = "{path}"
''')
    try:
        out = subprocess.run([sys.executable, "-m", "vmrun", "up", str(machine)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=120)
    finally:
        stop.set()
        t.join(5)
        srv.close()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout, bytes(got)


def test_native_guest_transmits(tmp_path: Path) -> None:
    text, got = _run(tmp_path, "t", 100, source=False)
    assert "e1000: done" in text and f"end tx frames={FRAMES}" in text, text
    # Every frame reached the host, framed, intact: broadcast, the card's MAC, the pattern.
    frames, pos = [], 0
    while pos + 4 <= len(got):
        n = struct.unpack_from(">I", got, pos)[0]
        frames.append(got[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert len(frames) == FRAMES
    mac = frames[0][6:12]
    assert mac[0] & 2 and not mac[0] & 1                # locally administered unicast
    for f in frames:
        assert len(f) == 100 and f[:6] == b"\xff" * 6 and f[6:12] == mac
        assert f[14:] == bytes(k & 0xFF for k in range(14, 100))


def test_native_guest_receives(tmp_path: Path) -> None:
    text, _ = _run(tmp_path, "r", 200, source=True)
    assert "e1000: done" in text and f"end rx frames={FRAMES}" in text, text
