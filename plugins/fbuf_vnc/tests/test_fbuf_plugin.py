"""The ``fbuf`` emulation as a machine file sees it: its options, the factory (one VNC server
per run, kept across boots; ``wait``), and ``vmrun vnc-capture``."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from vmrun_fbuf_vnc.client import RfbClient

from plugins.fbuf_vnc.tests.fbufrig import Rig
from vmrun.core.host import HostContext
from vmrun.plugins import get_registry
from vmrun.plugins.registry import DeviceContext, OptionError, validate_options


def _opts(**table):
    dtype = get_registry().get("fbuf")
    assert dtype is not None, "the fbuf plugin is not installed"
    return validate_options(dtype, table, Path("."))


def test_options_and_defaults(tmp_path: Path) -> None:
    o = _opts()
    assert o["listen"] == "127.0.0.1:5900" and (o["w"], o["h"]) == (1024, 768)
    assert o["password"] is None and o["wait"] is False
    assert _opts(listen="/run/vm.sock")["listen"] == "/run/vm.sock"
    for bad in ({"listen": "5900"}, {"listen": "host:port"}, {"w": 2560}, {"h": 100},
                {"password": ""}, {"wait": "yes"}):
        with pytest.raises(OptionError):
            _opts(**bad)
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    with pytest.raises(OptionError) as e:
        _opts(password="x", password_file=str(pw))
    assert e.value.key == "password_file"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_one_server_per_run_kept_across_boots(tmp_path: Path) -> None:
    host = HostContext()
    host.start()
    try:
        dtype = get_registry().get("fbuf")
        port = _free_port()
        pw = tmp_path / "pw"
        pw.write_text("hunter2\n")
        opts = _opts(listen=f"127.0.0.1:{port}", password_file=str(pw), w=800, h=600)
        ctx = DeviceContext("fb", "m", "uuid", host)
        first = dtype.factory(ctx, opts)
        second = dtype.factory(ctx, opts)                  # the next boot
        assert first.server is second.server
        assert first.edid == second.edid and first.preferred == (800, 600)
        c = RfbClient(("127.0.0.1", port), password="hunter2")
        assert c.handshake()[:2] == (800, 600)             # no mode yet: the preferred size
        c.close()
    finally:
        host.close()


def test_listen_failure_is_one_error(tmp_path: Path) -> None:
    from vmrun.api import VmrunError

    host = HostContext()
    host.start()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        dtype = get_registry().get("fbuf")
        opts = _opts(listen=f"127.0.0.1:{busy.getsockname()[1]}")
        with pytest.raises(VmrunError, match="devices.fb.listen: cannot listen"):
            dtype.factory(DeviceContext("fb", "m", "uuid", host), opts)
    finally:
        busy.close()
        host.close()


def test_wait_holds_the_boot_until_a_client_connects() -> None:
    host = HostContext()
    host.start()
    try:
        dtype = get_registry().get("fbuf")
        port = _free_port()
        opts = _opts(listen=f"127.0.0.1:{port}", wait=True)
        made = []
        t = threading.Thread(target=lambda: made.append(
            dtype.factory(DeviceContext("fb", "m", "uuid", host), opts)), daemon=True)
        t.start()
        t.join(1.0)
        assert t.is_alive() and not made                   # the guest does not start yet
        for _ in range(50):
            try:
                c = RfbClient(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                t.join(0.1)
        c.handshake()
        t.join(5)
        assert made
        c.close()
    finally:
        host.close()


def test_vnc_capture_command(tmp_path: Path) -> None:
    from PIL import Image

    rig = Rig()
    try:
        rig.set_mode(320, 200)
        rig.fill(10, 20, 30, 40, 0x00123456)
        out = tmp_path / "shot.png"
        host, port = rig.address
        r = subprocess.run([sys.executable, "-m", "vmrun", "vnc-capture", f"{host}:{port}",
                            str(out)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        img = Image.open(out).convert("RGB")
        assert img.size == (320, 200)
        assert img.getpixel((10, 20)) == (0x12, 0x34, 0x56)
        assert img.getpixel((0, 0)) == (0, 0, 0)
    finally:
        rig.close()
