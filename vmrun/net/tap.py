"""``backend = "tap"``: a Linux tap device with a virtio-net header on every frame.

The tap is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` and a 12-byte header
(``TUNSETVNETHDRSZ``), so checksum and TSO offloads pass through in both directions: frames
the guest sends with NEEDS_CSUM or GSO go to the host stack as they are, and the host hands
the guest large or partly checksummed frames only once the guest said it takes them
(``set_offloads`` -> ``TUNSETOFFLOAD``). An existing tap (``ifname``) is attached to as it
is; a missing one is created when vmrun may (root): it then lives as long as ``vmrun up`` and
is brought up.

One read is one frame: ``recv_into`` reads into the NIC's buffer with an overflow buffer
behind it, so a frame longer than the NIC's buffer is seen (and dropped, counted), never
truncated silently.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from vmrun.core.eventloop import EventLoop, Source
from vmrun.errors import VmrunError
from vmrun.net.backend import (
    CAP_CSUM,
    CAP_TSO4,
    CAP_TSO6,
    CAP_VNET_HDR,
    VNET_HDR_LEN,
    LinkCallbacks,
    NetBackend,
)

log = logging.getLogger("vmrun.net")

TUN_DEV = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16


def check_ifname(name: str) -> None:
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or not name.isprintable() \
            or any(c.isspace() for c in name) or name in (".", ".."):
        raise ValueError(f"{name!r} is not an interface name (at most 15 bytes, no '/' or "
                         "spaces)")


def check_tap(ifname: str | None) -> None:
    """What opening would trip over, for the machine-file check."""
    if ifname is not None:
        check_ifname(ifname)
    if not os.path.exists(TUN_DEV):
        raise ValueError(f"{TUN_DEV} does not exist (no tun/tap support on this host)")
    exists = ifname is not None and Path("/sys/class/net", ifname).exists()
    if not exists and os.geteuid() != 0:
        what = f"tap {ifname} does not exist" if ifname else "no ifname given"
        raise ValueError(f"{what}, and only root may create one (create it with `ip tuntap "
                         "add dev NAME mode tap vnet_hdr user $USER`)")


class TapBackend(NetBackend):
    def __init__(self, loop: EventLoop, ifname: str | None, mtu: int = 1500) -> None:
        super().__init__(kind="tap", mtu=mtu, link_up=True,
                         caps=frozenset({CAP_VNET_HDR, CAP_CSUM, CAP_TSO4, CAP_TSO6}))
        try:
            check_tap(ifname)
        except ValueError as e:
            raise VmrunError(f"tap: {e}") from None
        self.created = ifname is None or not Path("/sys/class/net", ifname).exists()
        self.loop = loop
        try:
            fd = os.open(TUN_DEV, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise VmrunError(f"tap: {TUN_DEV}: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", (ifname or "vmrun%d").encode(),
                              IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            out = fcntl.ioctl(fd, TUNSETIFF, ifr)
            self.ifname = out[:16].rstrip(b"\0").decode()
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except OSError as e:
            os.close(fd)
            raise VmrunError(f"tap {ifname or '(new)'}: {e.strerror} (is it a tap device you "
                             f"may open?)") from None
        self.fd = fd
        if self.created:
            self._bring_up()
        self._overflow = bytearray(65536 + VNET_HDR_LEN + 64)
        self.cb: LinkCallbacks | None = None
        self.rx_on = False
        self.want_write = False
        self.src: Source = loop.add(fd, self._ready, owner=self, events=select.EPOLLIN,
                                    enabled=False)
        self.rx_frames = self.tx_frames = 0

    def _bring_up(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            ifr = struct.pack("16sH22x", self.ifname.encode(), 0)
            flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, ifr), 16)[0]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", self.ifname.encode(),
                                                     flags | IFF_UP))
        except OSError as e:
            log.warning("tap %s: cannot bring it up: %s", self.ifname, e.strerror)
        finally:
            s.close()

    @property
    def name(self) -> str:
        return f"tap {getattr(self, 'ifname', '?')}"

    def attach(self, callbacks: LinkCallbacks) -> None:
        self.cb = callbacks
        self.rx_on = False
        self._update()

    def detach(self) -> None:
        self.cb = None
        self.rx_on = False
        self._update()
        self.set_offloads(frozenset())

    def set_rx(self, on: bool) -> None:
        if on != self.rx_on:
            self.rx_on = on
            self._update()

    def set_offloads(self, caps: frozenset[str]) -> None:
        flags = 0
        if CAP_CSUM in caps:
            flags |= TUN_F_CSUM
            if CAP_TSO4 in caps:
                flags |= TUN_F_TSO4
            if CAP_TSO6 in caps:
                flags |= TUN_F_TSO6
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            log.warning("%s: TUNSETOFFLOAD %#x: %s", self.name, flags, e.strerror)

    def _update(self) -> None:
        ev = 0
        if self.rx_on and self.cb is not None:
            ev |= select.EPOLLIN
        if self.want_write:
            ev |= select.EPOLLOUT
        if ev:
            self.src.modify(ev)
            self.src.enable()
        else:
            self.src.disable()

    def _ready(self, fd: int) -> None:
        cb = self.cb                 # the NIC may detach from another thread (a reboot)
        if self.want_write:
            self.want_write = False
            self._update()
            if cb is not None:
                cb.writable()
        if self.rx_on and cb is not None:
            cb.readable()

    def recv_into(self, buf: memoryview) -> int:
        while True:
            try:
                n = os.readv(self.fd, [buf, self._overflow])
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as e:
                log.warning("%s: read: %s", self.name, e.strerror)
                return 0
            if n <= len(buf) and n > VNET_HDR_LEN:
                self.rx_frames += 1
                return n
            if n == 0:
                return 0
            self.rx_dropped += 1

    def send(self, frame: Sequence[memoryview | bytes]) -> bool:
        try:
            os.writev(self.fd, frame)
        except (BlockingIOError, InterruptedError):
            self.want_write = True
            self._update()
            return False
        except OSError:
            self.tx_dropped += 1        # EINVAL (a header the host refused), EIO (link down)
            return True
        self.tx_frames += 1
        return True

    def close(self) -> None:
        if self.fd >= 0:
            self.src.remove()
            os.close(self.fd)
            self.fd = -1
