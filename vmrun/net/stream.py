"""Backends over a stream socket with QEMU's framing: passt (``user``) and ``socket``.

QEMU's ``-netdev stream``/``socket`` (and passt) carry each Ethernet frame as a 4-byte
big-endian length followed by the frame. :class:`StreamLink` does that over one connected
non-blocking socket, on the event loop:

- the socket is watched for reading only while the NIC has receive buffers (``set_rx``);
  otherwise only for a hang-up (EPOLLRDHUP), so a peer that leaves still takes the link down;
- a frame longer than the NIC's buffer is dropped (counted); a length over ``MAX_FRAME`` is a
  broken peer: the connection is closed and the link goes down;
- ``send`` gathers the length and the frame's pieces in one ``sendmsg``; a frame the socket
  takes only in part is finished from a small pending buffer before anything else goes out
  (``send`` answers False meanwhile, and the NIC hears ``writable`` when it is through);
- with ``strip_padding`` (passt), a frame of at most 60 bytes goes out without the Ethernet
  padding after its IP packet (:func:`unpadded`).

:class:`SocketBackend` listens on or connects to a unix path or a loopback TCP port: a
listener takes one peer at a time (the link is up while one is connected), a connector tries
again every second while the peer is away.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from vmrun.core.eventloop import EventLoop, Source
from vmrun.net.backend import VNET_HDR_LEN, LinkCallbacks, NetBackend

log = logging.getLogger("vmrun.net")

MAX_FRAME = 65536 + VNET_HDR_LEN + 64       # larger lengths: the peer is broken
RBUF_SIZE = 4 * MAX_FRAME
_LEN = struct.Struct(">I")
IOV_BATCH = 1024                            # pieces per sendmsg (the kernel's UIO_MAXIOV)
EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
ETH_ZLEN = 60                               # frames are padded up to this on a wire


def unpadded(frame: Sequence[memoryview | bytes], n: int) -> tuple[list[bytes], int]:
    """A short IPv4/IPv6 frame (``n`` bytes, up to 60) cut to its IP packet's length.

    Ethernet pads frames to 60 bytes, and some guest drivers do so themselves (Linux's
    e1000 does, for every frame). A receiver must take the IP header's length, but passt
    (Debian 12's) reads the padding of a pure TCP ACK as payload and ignores the ACK, then
    resets the connection. Anything else (ARP, VLAN tags, odd lengths) is left as it is."""
    data = b"".join(bytes(p) for p in frame)
    if n >= 14 + 20:
        ethertype = data[12] << 8 | data[13]
        if ethertype == 0x0800:
            real = 14 + (data[16] << 8 | data[17])
        elif ethertype == 0x86DD and n >= 14 + 40:
            real = 14 + 40 + (data[18] << 8 | data[19])
        else:
            real = n
        if 14 + 20 <= real < n:
            return [data[:real]], real
    return [data], n


class StreamLink(NetBackend):
    """One end of a framed stream. Subclasses find the socket (``_connected``) and say what
    happens when it goes away (``_disconnected``)."""

    #: Send short frames without their Ethernet padding (see :func:`unpadded`).
    strip_padding = False

    def __init__(self, loop: EventLoop, kind: str, mtu: int = 1500) -> None:
        super().__init__(kind=kind, mtu=mtu, link_up=False)
        self.loop = loop
        self.sock: socket.socket | None = None
        self.src: Source | None = None
        self.cb: LinkCallbacks | None = None
        self.rx_on = False
        self.want_write = False
        self._rbuf = bytearray(RBUF_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0
        self._rend = 0
        self._wpending = b""
        self._hup = False
        self.rx_frames = 0
        self.tx_frames = 0

    # -- the contract ---------------------------------------------------------------------
    def attach(self, callbacks: LinkCallbacks) -> None:
        self.cb = callbacks
        self.rx_on = False
        self._update()

    def detach(self) -> None:
        self.cb = None
        self.rx_on = False
        self._update()

    def set_rx(self, on: bool) -> None:
        if on != self.rx_on:
            self.rx_on = on
            self._update()
            if on and self._rend > self._rstart:
                # Frames already read from the socket: epoll will not say so again.
                self.loop.call_soon(self._buffered, owner=self)

    def _buffered(self) -> None:
        cb = self.cb
        if self.rx_on and cb is not None and self._rend > self._rstart:
            cb.readable()

    def recv_into(self, buf: memoryview) -> int:
        """One frame into ``buf``; 0 when none is complete. Frames longer than ``buf`` (or
        empty) are dropped and counted."""
        rbuf = self._rbuf
        unpack = _LEN.unpack_from
        while True:
            start = self._rstart
            avail = self._rend - start
            if avail < 4 or avail < 4 + unpack(rbuf, start)[0]:
                if not self._fill():
                    return 0
                start = self._rstart
                avail = self._rend - start
                if avail < 4:
                    return 0
            length = unpack(rbuf, start)[0]
            if length > MAX_FRAME:
                log.warning("%s: peer sent a frame length of %d: disconnected", self.name,
                            length)
                self._lost()
                return 0
            if avail < 4 + length:
                return 0
            self._rstart = start + 4 + length
            if length > len(buf) or length == 0:
                self.rx_dropped += 1
                continue
            buf[:length] = self._rview[start + 4:start + 4 + length]
            self.rx_frames += 1
            return length

    def _fill(self) -> bool:
        """Read what the socket has; False when nothing new came."""
        sock = self.sock
        if sock is None:
            return False
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        elif self._rend > RBUF_SIZE - MAX_FRAME - 4:
            n = self._rend - self._rstart
            self._rbuf[:n] = self._rbuf[self._rstart:self._rend]
            self._rstart, self._rend = 0, n
        try:
            n = sock.recv_into(self._rview[self._rend:])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            log.warning("%s: %s: link down", self.name, e.strerror)
            self._lost()
            return False
        if n == 0:
            self._lost()
            return False
        self._rend += n
        return True

    def send(self, frame: Sequence[memoryview | bytes]) -> bool:
        sock = self.sock
        if sock is None or not self.link_up:
            self.tx_dropped += 1
            return True
        if self._wpending:
            self._flush()
            if self._wpending:
                return False
        total = 0
        for piece in frame:
            total += len(piece)
        if total > MAX_FRAME:
            self.tx_dropped += 1
            return True
        if total <= ETH_ZLEN and self.strip_padding:
            frame, total = unpadded(frame, total)
        hdr = _LEN.pack(total)
        try:
            sent = sock.sendmsg([hdr, *frame])
        except (BlockingIOError, InterruptedError):
            self._wait_writable()
            return False
        except OSError as e:
            log.warning("%s: %s: link down", self.name, e.strerror)
            self._lost()
            return True
        if sent < total + 4:
            self._wpending = (hdr + b"".join(bytes(p) for p in frame))[sent:]
            self._wait_writable()
        self.tx_frames += 1
        return True

    def send_many(self, frames) -> int:
        """Up to ``IOV_BATCH`` pieces per ``sendmsg``: a batch of small frames costs one
        system call instead of one each."""
        sock = self.sock
        if sock is None or not self.link_up:
            self.tx_dropped += len(frames)
            return len(frames)
        if self._wpending:
            self._flush()
            if self._wpending:
                return 0
        taken = 0
        nframes = len(frames)
        while taken < nframes:
            iov: list = []
            ends: list[int] = []         # byte offset where each frame of this call ends
            total = 0
            j = taken
            while j < nframes and len(iov) < IOV_BATCH - 8:
                frame = frames[j]
                n = 0
                for piece in frame:
                    n += len(piece)
                if n > MAX_FRAME:
                    self.tx_dropped += 1
                    n = -1
                elif n <= ETH_ZLEN and self.strip_padding:
                    frame, n = unpadded(frame, n)
                if n >= 0:
                    iov.append(_LEN.pack(n))
                    iov.extend(frame)
                    total += 4 + n
                ends.append(total)
                j += 1
            try:
                sent = sock.sendmsg(iov) if iov else 0
            except (BlockingIOError, InterruptedError):
                self._wait_writable()
                return taken
            except OSError as e:
                log.warning("%s: %s: link down", self.name, e.strerror)
                self._lost()
                return nframes
            done = 0
            while done < len(ends) and ends[done] <= sent:
                done += 1
            if done < len(ends) and sent > (ends[done - 1] if done else 0):
                # a frame went out in part: the rest of it goes first from a pending buffer
                self._wpending = b"".join(bytes(p) for p in iov)[sent:ends[done]]
                done += 1
                self.tx_frames += done
                self._wait_writable()
                return taken + done
            self.tx_frames += done
            taken += done
            if done < len(ends):
                self._wait_writable()
                return taken
        return taken

    def _wait_writable(self) -> None:
        self.want_write = True
        self._update()

    def _flush(self) -> None:
        sock = self.sock
        if sock is None:
            self._wpending = b""
            return
        try:
            n = sock.send(self._wpending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        self._wpending = self._wpending[n:]

    # -- the loop side --------------------------------------------------------------------
    def _events(self) -> int:
        ev = EPOLLRDHUP
        if self.rx_on and self.cb is not None:
            ev |= select.EPOLLIN
        if self.want_write:
            ev |= select.EPOLLOUT
        return ev

    def _update(self) -> None:
        src = self.src
        if src is None:
            return
        ev = self._events()
        if self._hup and not ev & (select.EPOLLIN | select.EPOLLOUT):
            src.disable()          # a hang-up with data left: nothing to wait for until rx
            return
        src.modify(ev)
        src.enable()

    def _ready(self, fd: int) -> None:
        cb = self.cb                 # the NIC may detach from another thread (a reboot)
        if self.want_write:
            if self._wpending:
                self._flush()
            if not self._wpending:
                self.want_write = False
                self._update()
                if cb is not None:
                    cb.writable()
            return
        if self.rx_on and cb is not None:
            # Level-triggered: a NIC out of buffers switches us off; otherwise the next
            # wake-up reads on.
            cb.readable()
            return
        # Woken neither to read nor to write: the peer hung up (or the socket broke).
        if self._rend > self._rstart:
            # Frames it sent before leaving are still in our buffer: they go to the NIC
            # first; the end of the stream is seen when the buffer runs dry.
            self._hup = True
            self._update()
            return
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) \
                if self.sock is not None else b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
        else:
            # Data and a hang-up: read it when the NIC has buffers; stop watching until then.
            self._hup = True
            self._update()

    def _connected(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        for opt, val in ((socket.SO_SNDBUF, 1 << 21), (socket.SO_RCVBUF, 1 << 21)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, val)
            except OSError:
                pass
        self.sock = sock
        self._hup = False
        self._rstart = self._rend = 0
        self._wpending = b""
        self.want_write = False
        self.src = self.loop.add(sock.fileno(), self._ready, owner=self, events=self._events())
        self._set_link(True)

    def _lost(self) -> None:
        """The connection is gone: close it, link down, let the subclass decide what next."""
        if self.src is not None:
            self.src.remove()
            self.src = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._wpending = b""
        self._rstart = self._rend = 0
        if self.want_write:
            self.want_write = False
            cb = self.cb
            if cb is not None:
                cb.writable()       # sends are dropped now: the NIC may go on
        self._set_link(False)
        self._disconnected()

    def _disconnected(self) -> None:
        """Hook: the peer went away."""

    def _set_link(self, up: bool) -> None:
        if up != self.link_up:
            self.link_up = up
            cb = self.cb
            if cb is not None:
                cb.link(up)

    def fault(self, reason: str) -> None:
        log.error("%s: %s: link down", self.name, reason)
        self._lost()

    def close(self) -> None:
        self.cb = None
        if self.src is not None:
            self.src.remove()
            self.src = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.link_up = False


def parse_endpoint(text: str, base_dir: Path | None = None) -> tuple[str, object]:
    """``"127.0.0.1:5555"`` / ``"localhost:5555"`` / ``"[::1]:5555"`` -> ("tcp", (host,
    port)); anything else is a unix socket path (relative to ``base_dir``). Only loopback
    addresses are taken for TCP: the link carries a guest's raw frames."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host and "/" not in host:
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        if host not in ("127.0.0.1", "::1") and not host.startswith("127."):
            raise ValueError(f"TCP endpoints must be on the loopback (127.0.0.1, ::1), "
                             f"not {host}")
        p = int(port)
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} is outside 1-65535")
        return "tcp", (host, p)
    if not text:
        raise ValueError("empty socket path")
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if len(os.fsencode(path)) > 107:
        raise ValueError(f"unix socket paths are at most 107 bytes, {path} is "
                         f"{len(os.fsencode(path))}")
    return "unix", path


class SocketBackend(StreamLink):
    """``backend = "socket"``: ``listen`` or ``connect`` on a unix path or loopback port."""

    RETRY_S = 1.0

    def __init__(self, loop: EventLoop, mode: str, endpoint: tuple[str, object],
                 mtu: int = 1500) -> None:
        super().__init__(loop, "socket", mtu)
        self.mode = mode
        self.family, self.address = endpoint
        self.listener: socket.socket | None = None
        self.listen_src: Source | None = None
        self.timer = None
        self._closed = False
        self._unlink: Path | None = None
        if mode == "listen":
            self._listen()
        else:
            self._try_connect(first=True)

    def _new_socket(self) -> socket.socket:
        if self.family == "unix":
            return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        fam = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET  # type: ignore
        s = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _listen(self) -> None:
        s = self._new_socket()
        try:
            if self.family == "unix":
                path = Path(self.address)  # type: ignore[arg-type]
                if path.is_socket():
                    path.unlink()          # a stale socket of an earlier run
                s.bind(str(path))
                self._unlink = path
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(self.address)  # type: ignore[arg-type]
            s.listen(1)
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        self.listener = s
        self.listen_src = self.loop.add(s.fileno(), self._accept, owner=self)

    def _accept(self, fd: int) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.sock is not None:          # one peer at a time: the link is point to point
            conn.close()
            return
        if self.family == "tcp":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connected(conn)

    def _try_connect(self, first: bool = False) -> None:
        if self._closed or self.sock is not None:
            return
        s = self._new_socket()
        try:
            s.connect(str(self.address) if self.family == "unix" else self.address)
        except OSError as e:
            s.close()
            if first:
                log.info("%s: %s: %s; trying again every %gs", self.name, self.address,
                         e.strerror or errno.errorcode.get(e.errno or 0, "?"), self.RETRY_S)
            self._retry()
            return
        self._connected(s)

    def _retry(self) -> None:
        if self.timer is None:
            self.timer = self.loop.timer(self._try_connect, owner=self)
        self.timer.arm(self.RETRY_S)

    def _disconnected(self) -> None:
        if self._closed:
            return
        log.info("%s: peer %s went away: link down", self.name, self.address)
        if self.mode == "connect":
            self._retry()

    def close(self) -> None:
        self._closed = True
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        if self.listen_src is not None:
            self.listen_src.remove()
            self.listen_src = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._unlink is not None:
            try:
                self._unlink.unlink()
            except OSError:
                pass
        super().close()
