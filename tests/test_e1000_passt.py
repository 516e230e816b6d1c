"""The e1000 on the ``user`` backend (passt) without a Linux guest: the mock driver plays a
TCP client (ARP, handshake, GET, an ACK per segment) and fetches 192 KiB from an HTTP server
on the host's loopback through passt; the bytes must come through whole and in order.

This is the check that found passt taking Ethernet padding of short frames for TCP data
(the e1000 once padded to 60 bytes as TCTL.PSP does on a wire; passt reset the connection).
The mock driver pads every frame to 60 bytes itself, as Linux's e1000 driver does
(``eth_skb_pad``): the ``user`` backend must strip that padding before passt sees it.
"""

from __future__ import annotations

import http.server
import os
import shutil
import struct
import threading
import time

import pytest
from vmrun_e1000.device import E1000

from vmrun.testing import FakeVm
from vmrun.testing.e1000 import E1000Driver, ip_packet

MAC = bytes.fromhex("32ea497dbaac")
GW, ME = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
BLOB = os.urandom(192 * 1024)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:          # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB)

    def log_message(self, *args) -> None:
        pass


def test_tcp_fetch_through_passt() -> None:
    if shutil.which("passt") is None:
        pytest.fail("passt is missing (make deps installs it)")
    from vmrun.net.passt import UserBackend

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    vm = FakeVm(64 << 20)
    be = UserBackend(vm.loop, [], 1500)
    try:
        dev = E1000(be, MAC)
        vm.pci.add(dev, 6)
        vm.pci.assign_bars()
        d = E1000Driver(vm, 6)
        d.reset()
        d.up(tx_count=256, rx_count=256)
        end = time.monotonic() + 10
        while not be.link_up and time.monotonic() < end:
            time.sleep(0.02)
        assert be.link_up
        arp = b"\xff" * 6 + MAC + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + \
            MAC + ME + bytes(6) + GW
        d.send(arp.ljust(60, b"\0"))
        gw = next(f[6:12] for f, *_ in d.receive(1) if f[12:14] == b"\x08\x06")

        def tcp(seq: int, ack: int, flags: int, payload: bytes = b"", opts: bytes = b"") -> bytes:
            h = struct.pack(">HHIIBBHHH", 40000, srv.server_port, seq, ack,
                            (20 + len(opts)) // 4 << 4, flags, 65535, 0, 0) + opts
            # padded to 60 bytes by the driver, as Linux's e1000 driver does
            return ip_packet(MAC, gw, 6, h + payload, src_ip=ME, dst_ip=GW).ljust(60, b"\0")

        d.send(tcp(1000, 0, 0x02, opts=struct.pack(">BBH", 2, 4, 1460) + b"\x01\x03\x03\x07"))
        synack = d.receive(1)[0][0]
        assert synack[47] == 0x12                             # SYN+ACK
        isn = struct.unpack_from(">I", synack, 38)[0]
        req = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
        d.send(tcp(1001, isn + 1, 0x10))
        d.send(tcp(1001, isn + 1, 0x18, req))
        data, nxt = b"", isn + 1
        end = time.monotonic() + 30
        while BLOB not in data and time.monotonic() < end:
            for f, _st, _err, _sp in d.receive(0, timeout=0.01):
                if f[12:14] != b"\x08\x00" or f[23] != 6:
                    continue
                th = 14 + (f[14] & 15) * 4
                assert not f[th + 13] & 0x04, "passt reset the connection"
                seq = struct.unpack_from(">I", f, th + 4)[0]
                payload = f[th + (f[th + 12] >> 4) * 4:14 + struct.unpack_from(">H", f, 16)[0]]
                if seq == nxt and payload:
                    data += payload
                    nxt += len(payload)
                d.send(tcp(1001 + len(req), nxt, 0x10))
        assert data.endswith(BLOB), f"{len(data)} bytes of {len(BLOB)}"
        assert not dev.broken and not vm.loop.faults
    finally:
        be.close()
        vm.close()
        srv.shutdown()
