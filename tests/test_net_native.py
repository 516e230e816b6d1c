"""KVM tests with the native ``vnet`` guest (vmrun/testing/native/vnet.c) on a socket link to
this test: frames both ways through virtio-net under vmrun, and the echo responder answering
ARP and ICMP echo (what the end-to-end test pings over a link between two VMs)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmrun.testing import native

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed"),
]
GUEST_MAC = bytes.fromhex("020000000302")
HOST_MAC = bytes.fromhex("020000000301")


def _machine(tmp_path: Path, cmdline: str, sock: Path) -> Path:
    m = tmp_path / "vnet.toml"
    m.write_text(f'''name = "vnet"
cpus = 1
memory = "64M"
on_reboot = "exit"
[boot]
kernel = "{native.build("vnet")}"
cmdline = "{cmdline}"
[serial.debugcon]
backend = "file"
path = "{tmp_path / "debugcon.log"}"
[devices.net]
model = "virtio-net"
backend = "socket"
connect = "{sock}"
mac = "02:00:00:00:03:02"
''')
    return m


def _recv_frame(conn: socket.socket) -> bytes:
    hdr = b""
    while len(hdr) < 4:
        chunk = conn.recv(4 - len(hdr))
        if not chunk:
            raise EOFError
        hdr += chunk
    n = struct.unpack(">I", hdr)[0]
    data = b""
    while len(data) < n:
        data += conn.recv(n - len(data))
    return data


def _listen(tmp_path: Path) -> tuple[socket.socket, Path]:
    sock = tmp_path / "link.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock))
    srv.listen(1)
    srv.settimeout(30)
    return srv, sock


def test_vnet_sends_and_receives_through_vmrun(tmp_path: Path) -> None:
    srv, sock = _listen(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "vmrun", "up",
                             str(_machine(tmp_path, "tests=tr count=300 size=200", sock))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        conn, _ = srv.accept()
        conn.settimeout(30)
        frames = [_recv_frame(conn) for _ in range(300)]
        assert all(len(f) == 200 and f[:6] == b"\xff" * 6 and f[6:12] == GUEST_MAC
                   and f[12:14] == b"\x88\xb5" for f in frames)
        f = b"\xff" * 6 + HOST_MAC + b"\x88\xb5" + bytes(186)
        conn.sendall((struct.pack(">I", 200) + f) * 300)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    log = (tmp_path / "debugcon.log").read_text()
    assert "end tx frames=300 bytes=60000" in log and "end rx frames=300 bytes=60000" in log, \
        log + out.decode(errors="replace")
    assert proc.returncode == 0


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def test_vnet_echo_answers_arp_and_ping(tmp_path: Path) -> None:
    srv, sock = _listen(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "vmrun", "up",
                             str(_machine(tmp_path, "echo=1 ip=10.0.3.2", sock))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        conn, _ = srv.accept()
        conn.settimeout(30)
        end = time.monotonic() + 30
        while "echo ready" not in (tmp_path / "debugcon.log").read_text(errors="replace"):
            assert time.monotonic() < end
            time.sleep(0.1)
        arp = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, HOST_MAC, b"\x0a\0\x03\x01",
                          bytes(6), b"\x0a\0\x03\x02")
        f = b"\xff" * 6 + HOST_MAC + b"\x08\x06" + arp + bytes(18)
        conn.sendall(struct.pack(">I", len(f)) + f)
        reply = _recv_frame(conn)
        assert reply[:6] == HOST_MAC and reply[6:12] == GUEST_MAC and reply[12:14] == b"\x08\x06"
        assert reply[20:22] == b"\x00\x02" and reply[22:28] == GUEST_MAC
        assert reply[28:32] == b"\x0a\0\x03\x02" and reply[38:42] == b"\x0a\0\x03\x01"
        icmp = struct.pack(">BBHHH", 8, 0, 0, 0x1234, 1) + b"vmrun-ping" * 4
        icmp = icmp[:2] + struct.pack(">H", _csum(icmp)) + icmp[4:]
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
                         b"\x0a\0\x03\x01", b"\x0a\0\x03\x02")
        ip = ip[:10] + struct.pack(">H", _csum(ip)) + ip[12:]
        f = GUEST_MAC + HOST_MAC + b"\x08\x00" + ip + icmp
        conn.sendall(struct.pack(">I", len(f)) + f)
        reply = _recv_frame(conn)
        assert reply[12:14] == b"\x08\x00" and reply[26:30] == b"\x0a\0\x03\x02"
        body = reply[34:]
        assert body[0] == 0 and body[4:] == icmp[4:]          # echo reply, same payload
        assert _csum(body) == 0                                # a valid checksum
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
def test_vmrun_and_qemu_share_a_socket_link(tmp_path: Path) -> None:
    """vmrun listens, QEMU's -netdev stream connects: the vnet guest under QEMU sends 300
    frames, the one under vmrun receives them."""
    sock = tmp_path / "link.sock"
    m = _machine(tmp_path, "tests=r count=300 size=200", sock)
    m.write_text(m.read_text().replace(f'connect = "{sock}"', f'listen = "{sock}"'))
    vm = subprocess.Popen([sys.executable, "-m", "vmrun", "up", str(m)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    qemu = None
    try:
        end = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < end and vm.poll() is None, "vmrun did not listen"
            time.sleep(0.1)
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-enable-kvm", "-M", "pc", "-nodefaults", "-no-reboot",
             "-display", "none", "-cpu", "qemu64,-cx16", "-m", "64",
             "-kernel", str(native.build("vnet")), "-append", "tests=t count=300 size=200",
             "-chardev", f"file,id=dbg,path={tmp_path / 'qemu.log'}",
             "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
             "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
             "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,mac=02:00:00:00:04:01"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, _ = vm.communicate(timeout=300)
    finally:
        vm.kill()
        vm.wait()
        if qemu is not None:
            qemu.kill()
            qemu.wait()
    log = (tmp_path / "debugcon.log").read_text()
    assert "end rx frames=300 bytes=60000" in log, log + out.decode(errors="replace")
    assert "end tx frames=300" in (tmp_path / "qemu.log").read_text()
