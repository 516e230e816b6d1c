"""The machine-file side of a NIC: its backend options, their checks, the MAC address.

Every NIC emulation (virtio-net, e1000) declares ``NET_OPTIONS`` besides its own, checks them
with :func:`check_net_options` (so ``vmrun check`` refuses a missing passt, a taken host
port, a bad MAC, keys of another backend), and gets its backend from
:func:`open_net_backend`, through ``ctx.host_resource``: one backend per device for the whole
``vmrun up``, kept across guest reboots.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from vmrun.errors import VmrunError
from vmrun.net.backend import NetBackend
from vmrun.plugins.registry import DeviceContext, Option

BACKENDS = ("user", "tap", "socket")
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
# Which keys belong to which backend (the others refuse them).
_BACKEND_KEYS = {"forward": "user", "ifname": "tap", "listen": "socket", "connect": "socket"}


def parse_mac(text: str) -> bytes:
    if not MAC_RE.fullmatch(text):
        raise ValueError("must be six hex bytes separated by colons, e.g. "
                         "\"52:54:00:12:34:56\"")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ValueError("is a multicast address (the first byte must be even)")
    if mac == bytes(6):
        raise ValueError("is all zeros")
    return mac


def derive_mac(uuid: str, dev_id: str) -> bytes:
    """A stable, locally administered unicast MAC from the machine UUID and the device id:
    the same machine file gives the guest the same MAC (and its DHCP lease) every run."""
    h = bytearray(hashlib.sha256(f"vmrun-nic:{uuid}:{dev_id}".encode()).digest()[:6])
    h[0] = (h[0] & 0xFC) | 0x02
    return bytes(h)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _mac(value: str) -> None:
    parse_mac(value)


def _forwards(value: list[str]) -> None:
    from vmrun.net.passt import parse_forward

    for item in value:
        parse_forward(item)


NET_OPTIONS = [
    Option("backend", "choice", "host side of the link: user (passt, no root), tap, socket",
           "user", choices=BACKENDS),
    Option("mac", "str", "MAC address (default: derived from the machine UUID and device id)",
           validate=_mac),
    Option("forward", "list", "user: host ports to the guest, \"tcp|udp:[ADDR:]HOST:GUEST\" "
           "(HOST \"auto\": a free port, see vmrun ps/ssh)",
           [], max=64, validate=_forwards),
    Option("ifname", "str", "tap: the tap device (created when missing, as root)"),
    Option("listen", "str", "socket: listen on a unix path or 127.0.0.1:PORT"),
    Option("connect", "str", "socket: connect to a unix path or 127.0.0.1:PORT"),
    Option("capture", "path", "write every frame on the link to this pcap file"),
]


def _err(option: str, message: str) -> ValueError:
    e = ValueError(message)
    e.option = option   # type: ignore[attr-defined]
    return e


def check_net_options(opts: dict[str, Any]) -> None:
    """Cross-option checks (raise ValueError, ``e.option`` names the key)."""
    from vmrun.net import passt, stream, tap

    backend = opts["backend"]
    for key, owner in _BACKEND_KEYS.items():
        given = opts.get(key)
        if given not in (None, []) and owner != backend:
            raise _err(key, f"only the {owner} backend takes {key} (this one is {backend})")
    if backend == "user":
        try:
            passt.find_passt()
        except ValueError as e:
            raise _err("backend", str(e)) from None
        try:
            passt.check_forwards([passt.parse_forward(f) for f in opts["forward"]])
        except ValueError as e:
            raise _err("forward", str(e)) from None
    elif backend == "tap":
        try:
            tap.check_tap(opts["ifname"])
        except ValueError as e:
            raise _err("ifname" if opts["ifname"] else "backend", str(e)) from None
    else:
        if (opts["listen"] is None) == (opts["connect"] is None):
            raise _err("backend", "the socket backend takes one of listen or connect")
        key = "listen" if opts["listen"] is not None else "connect"
        try:
            kind, where = stream.parse_endpoint(opts[key])
            if kind == "unix":
                p = Path(where)  # type: ignore[arg-type]
                if p.is_absolute() and not p.parent.is_dir():
                    raise ValueError(f"directory {p.parent} does not exist")
                if key == "listen" and p.is_absolute() and p.exists() and not p.is_socket():
                    raise ValueError(f"{p} exists and is not a socket")
        except ValueError as e:
            raise _err(key, str(e)) from None
    cap = opts.get("capture")
    if cap is not None:
        if not Path(cap).parent.is_dir():
            raise _err("capture", f"directory {Path(cap).parent} does not exist")
        if Path(cap).is_dir():
            raise _err("capture", f"{cap} is a directory")


def nic_mac(ctx: DeviceContext, opts: dict[str, Any]) -> bytes:
    return parse_mac(opts["mac"]) if opts.get("mac") else derive_mac(ctx.uuid, ctx.id)


def _create(ctx: DeviceContext, opts: dict[str, Any], mtu: int) -> NetBackend:
    from vmrun.net.capture import CaptureBackend
    from vmrun.net.passt import UserBackend, parse_forward
    from vmrun.net.stream import SocketBackend, parse_endpoint
    from vmrun.net.tap import TapBackend

    backend = opts["backend"]
    loop = ctx.loop
    try:
        if backend == "user":
            user = UserBackend(loop, [parse_forward(f) for f in opts["forward"]], mtu)
            for f in user.forwards:
                ctx.host.published[f"{ctx.id}:{f.proto}:{f.guest_port}"] = f.host_port
            be: NetBackend = user
        elif backend == "tap":
            be = TapBackend(loop, opts["ifname"], mtu)
        else:
            mode = "listen" if opts["listen"] is not None else "connect"
            endpoint = parse_endpoint(opts[mode], ctx.base_dir)
            try:
                be = SocketBackend(loop, mode, endpoint, mtu)
            except OSError as e:
                raise VmrunError(f"devices.{ctx.id}.{mode}: {opts[mode]}: {e.strerror}") \
                    from None
    except ValueError as e:
        raise VmrunError(f"devices.{ctx.id}: {e}") from None
    except VmrunError as e:
        if str(e).startswith("devices."):
            raise
        raise VmrunError(f"devices.{ctx.id}: {e}") from None
    if opts.get("capture") is not None:
        try:
            be = CaptureBackend(be, Path(opts["capture"]))
        except BaseException:
            be.close()
            raise
    return be


def open_net_backend(ctx: DeviceContext, opts: dict[str, Any], mtu: int = 1500) -> NetBackend:
    """The device's backend: made on the first boot, the same object on every later one."""
    return ctx.host_resource("net", lambda: _create(ctx, opts, mtu))
