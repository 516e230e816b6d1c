"""The VNC server: RFB 3.8 (3.7 and 3.3 for old clients) on the devices' event loop.

One :class:`VncServer` per fbuf device and ``vmrun up``, a host resource: it keeps its
listening socket and its clients across guest reboots, and each boot's device attaches its
frame to it. Everything runs on the event loop thread with non-blocking sockets:

- a timer (every 30 ms while a client waits for an update, as QEMU's) refreshes the frame
  (:class:`~vmrun_fbuf_vnc.frame.FrameTracker`) and adds the changed tiles to every client's
  dirty set; a client gets an update when it asked for one and its send buffer has drained,
  built from the newest frame, so a slow client gets fewer, coalesced updates and never
  holds up the guest or another client;
- input: key events (X keysyms, US layout; or QEMU's extended key events with XT scancodes)
  become evdev key codes, pointer events absolute positions (or relative motion where no
  tablet is attached), all into the platform's input hub;
- a client that sends something malformed or hostile (an unknown message type, a bad pixel
  format, a cut text over 1 MiB, a bad version or security type), or does not read for 30 s
  while its buffer is full, is closed with one log line.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

from vmrun.api import ABS_MAX, EventLoop, InputHub
from vmrun_fbuf_vnc import encodings as enc
from vmrun_fbuf_vnc.des import vnc_response
from vmrun_fbuf_vnc.frame import TILE, Change, FrameTracker
from vmrun_fbuf_vnc.keymap import KEY_LEFTSHIFT, SHIFT_KEYSYMS, keysym_to_evdev, xt_to_evdev

log = logging.getLogger("vmrun.fbuf")

READABLE, WRITABLE = select.EPOLLIN, select.EPOLLOUT
# Seconds between looks at the frame while a client waits: QEMU's VNC refresh interval
# (30 ms, GUI_REFRESH_INTERVAL_DEFAULT), so clients see the same update rate from both.
REFRESH_INTERVAL = 0.030
SEC_NONE, SEC_VNC = 1, 2
MAX_CUT_TEXT = 1 << 20
MAX_ENCODINGS = 1024           # a client may list more: the rest are ignored
MAX_INBUF = MAX_CUT_TEXT + 64
SEND_LOW_WATER = 64 << 10      # build the next update only below this much unsent
MAX_OUTBUF = 64 << 20
STALL_S = 30.0
MAX_CLIENTS = 32

# client -> server message types
SET_PIXEL_FORMAT, SET_ENCODINGS, FB_UPDATE_REQUEST, KEY_EVENT, POINTER_EVENT, CUT_TEXT = \
    0, 2, 3, 4, 5, 6
SET_DESKTOP_SIZE, QEMU_CLIENT = 251, 255


class ClientError(Exception):
    """The client broke the protocol: it is closed with this reason."""


class Listen:
    """``listen``: "HOST:PORT" (IPv4 or [IPv6]) or a unix socket path (contains a /)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        if "/" in spec:
            self.unix: str | None = spec
            self.host, self.port = "", 0
            return
        self.unix = None
        host, sep, port = spec.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError('must be "HOST:PORT" (e.g. "127.0.0.1:5900") or a unix socket '
                             "path")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)

    def open(self) -> socket.socket:
        if self.unix is not None:
            p = Path(self.unix)
            if p.is_socket():
                p.unlink()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self.unix)
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.host, self.port))
        s.listen(8)
        s.setblocking(False)
        return s


#: What a client's ClientInit shared flag does (QEMU's ``-vnc share=`` policies):
#: "allow-exclusive" (the RFB rule, QEMU's default): a client asking for exclusive access
#: disconnects every other client, and while it is connected a client asking to share is
#: turned away; "force-shared": nobody gets exclusive access, a client asking for it is
#: turned away; "ignore": the flag is ignored, everybody shares.
SHARE_POLICIES = ("allow-exclusive", "force-shared", "ignore")


class VncServer:
    """Serves one frame to any number of clients. ``attach(dev)`` / ``detach(dev)`` from any
    thread (a boot's device); everything else on the loop thread."""

    name = "fbuf-vnc"

    def __init__(self, loop: EventLoop, hub: InputHub, *, listen: str = "127.0.0.1:5900",
                 password: str | None = None, desktop_name: str = "vmrun",
                 width: int = 1024, height: int = 768, dirty_log: bool = False,
                 share: str = "allow-exclusive") -> None:
        if share not in SHARE_POLICIES:
            raise ValueError(f"share: {share!r} is not one of {', '.join(SHARE_POLICIES)}")
        self.share = share
        self.loop = loop
        self.hub = hub
        self.password = password
        self.desktop_name = desktop_name
        self.tracker = FrameTracker(width, height, dirty_log=dirty_log)
        self.clients: list[Client] = []
        self.first_client = threading.Event()
        self.listen = Listen(listen)
        self.sock = self.listen.open()
        self.address = self.sock.getsockname()
        self._source = loop.add(self.sock.fileno(), self._accept, self)
        self._timer = loop.timer(self._tick, self)
        self._ticking = False
        self.closed = False
        self.updates_sent = 0
        self.last_refresh = 0.0
        self.bytes_sent = 0

    # -- the frame -------------------------------------------------------------------------
    def attach(self, dev) -> None:
        self._on_loop(self.tracker.attach, dev)
        self._on_loop(self._kick)

    def detach(self, dev) -> None:
        """Stop reading ``dev``'s framebuffer; returns once the loop has let go of it (the
        device's memory goes away right after)."""
        def drop() -> None:
            if self.tracker.dev is dev:
                self.tracker.attach(None)
        self._on_loop(drop)

    def _on_loop(self, fn, *args) -> None:
        if self.loop.on_loop_thread:
            fn(*args)
            return
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()
        self.loop.call_soon(run, owner=self)
        done.wait(5)

    def wait_for_client(self, timeout: float | None = None) -> bool:
        return self.first_client.wait(timeout)

    # -- sockets ---------------------------------------------------------------------------
    def _accept(self, _fd: int) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("vnc: accept: %s", e)
                return
            if len(self.clients) >= MAX_CLIENTS:
                log.warning("vnc: %d clients already: connection refused", MAX_CLIENTS)
                conn.close()
                continue
            conn.setblocking(False)
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"
            client = Client(self, conn, peer)
            self.clients.append(client)
            client.start()

    def _kick(self) -> None:
        """Make sure the refresh timer runs while a client waits for an update."""
        if not self._ticking and not self.closed and any(c.wants_update for c in self.clients):
            self._ticking = True
            self._timer.arm(REFRESH_INTERVAL, REFRESH_INTERVAL)

    def _tick(self) -> None:
        now = time.monotonic()
        for c in list(self.clients):
            c.check_stall(now)
        if not any(c.wants_update for c in self.clients):
            self._timer.cancel()
            self._ticking = False
            return
        self.refresh()
        for c in list(self.clients):
            c.maybe_send_update()

    def refresh(self) -> Change:
        self.last_refresh = time.monotonic()
        change = self.tracker.refresh(
            scrolls=any(enc.COPYRECT in c.encodings for c in self.clients))
        if change.resized or change.tiles:
            for c in self.clients:
                c.frame_changed(change)
        return change

    def removed(self, client: Client) -> None:
        if client in self.clients:
            self.clients.remove(client)

    def fault(self, reason: str) -> None:
        log.error("vnc: %s", reason)

    def close(self) -> None:
        """End of ``vmrun up``: close every client and the listener."""
        def shut() -> None:
            if self.closed:
                return
            self.closed = True
            for c in list(self.clients):
                c.close(None)
            self._timer.close()
            self._source.remove()
            self.sock.close()
            if self.listen.unix is not None:
                try:
                    os.unlink(self.listen.unix)
                except OSError:
                    pass
        self._on_loop(shut)


class Client:
    """One connection, from the version handshake to its last update."""

    def __init__(self, server: VncServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.name = f"vnc client {peer}"
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.state = "version"
        self.exclusive = False      # connected with the shared flag 0 (allow-exclusive)
        self.version = 8
        self.challenge = b""
        self.closed = False
        self.fmt = enc.SERVER_FORMAT
        self.encodings: list[int] = [enc.RAW]
        self.wants_update = False
        self.dirty: set[int] = set()
        self.scroll = 0
        self.resize_pending = False
        self.ext_key_ack = False
        self.size = (server.tracker.width, server.tracker.height)
        self.zlib_stream = zlib.compressobj(6)
        self.zrle_stream = zlib.compressobj(6)
        self.last_progress = time.monotonic()
        self.buttons = 0
        self.pointer = (0, 0)
        self.shift = False
        self.pressed: dict[int, int] = {}
        self.source = None
        self.writing = False

    # -- plumbing ----------------------------------------------------------------------------
    def start(self) -> None:
        self.source = self.server.loop.add(self.sock.fileno(), self._ready, self,
                                           events=READABLE)
        self.send(b"RFB 003.008\n")

    def fault(self, reason: str) -> None:
        self.close(f"internal error: {reason}")

    def close(self, reason: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        if reason:
            log.warning("vnc: client %s: %s: closed", self.peer, reason)
        if self.source is not None:
            self.source.remove()
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.removed(self)

    def _ready(self, _fd: int) -> None:
        self._write()
        if self.closed:
            return
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close(f"receive: {e.strerror}")
            return
        if not data:
            self.close(None)
            return
        self.inbuf += data
        try:
            self._parse()
        except ClientError as e:
            self.close(str(e))
            return
        if len(self.inbuf) > MAX_INBUF:
            self.close("message too long")

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.outbuf:
            # Straight to the socket; only what it does not take is copied into the buffer.
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close(None)
                return
            if n:
                self.last_progress = time.monotonic()
            if n == len(data):
                return
            data = memoryview(data)[n:]
        self.outbuf += data
        if len(self.outbuf) > MAX_OUTBUF:
            self.close("does not read its updates")
            return
        self._write()

    def _write(self) -> None:
        while self.outbuf and not self.closed:
            try:
                with memoryview(self.outbuf) as view:
                    n = self.sock.send(view[:8 << 20])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.debug("vnc: send to %s: %s", self.peer, e)
                self.close(None)
                return
            del self.outbuf[:n]
            self.last_progress = time.monotonic()
        want = bool(self.outbuf)
        if want != self.writing and self.source is not None and not self.closed:
            self.writing = want
            self.source.modify(READABLE | WRITABLE if want else READABLE)
        if not want and self.wants_update:
            self.maybe_send_update()

    def check_stall(self, now: float) -> None:
        if self.outbuf and now - self.last_progress > STALL_S:
            self.close(f"read nothing for {STALL_S:g}s")

    # -- the protocol ------------------------------------------------------------------------
    def _parse(self) -> None:
        buf = self.inbuf
        while buf and not self.closed:
            used = getattr(self, f"_on_{self.state}")(buf)
            if used == 0:
                return
            del buf[:used]

    def _on_version(self, buf: bytearray) -> int:
        if len(buf) < 12:
            return 0
        line = bytes(buf[:12])
        if not (line.startswith(b"RFB ") and line[7:8] == b"." and line[11:12] == b"\n"
                and line[4:7].isdigit() and line[8:11].isdigit()):
            raise ClientError(f"bad protocol version {line!r}")
        major, minor = int(line[4:7]), int(line[8:11])
        if major < 3:
            raise ClientError(f"bad protocol version {line!r}")
        self.version = 8 if major > 3 or minor >= 8 else 7 if minor == 7 else 3
        types = [SEC_VNC] if self.server.password else [SEC_NONE]
        if self.version == 3:
            self.send(struct.pack(">I", types[0]))
            self._security_chosen(types[0])
        else:
            self.send(bytes([len(types), *types]))
            self.state = "security"
        return 12

    def _on_security(self, buf: bytearray) -> int:
        choice = buf[0]
        allowed = SEC_VNC if self.server.password else SEC_NONE
        if choice != allowed:
            self._fail(f"security type {choice} was not offered")
            return 1
        self._security_chosen(choice)
        return 1

    def _security_chosen(self, sec: int) -> None:
        if sec == SEC_VNC:
            self.challenge = os.urandom(16)
            self.send(self.challenge)
            self.state = "auth"
        else:
            if self.version == 8:
                self.send(struct.pack(">I", 0))
            self.state = "init"

    def _on_auth(self, buf: bytearray) -> int:
        if len(buf) < 16:
            return 0
        expected = vnc_response(self.server.password or "", self.challenge)
        if bytes(buf[:16]) != expected:
            self._fail("authentication failed (wrong password)")
            return 16
        self.send(struct.pack(">I", 0))
        self.state = "init"
        return 16

    def _fail(self, reason: str) -> None:
        """A failed security step: the result (3.8: with the reason), then close."""
        msg = struct.pack(">I", 1)
        if self.version == 8:
            text = reason.encode()
            msg += struct.pack(">I", len(text)) + text
        self.send(msg)
        self._write()
        self.close(reason)

    def _on_init(self, buf: bytearray) -> int:
        shared = buf[0] != 0
        policy = self.server.share
        others = [c for c in self.server.clients if c is not self and c.state == "normal"]
        if policy == "allow-exclusive":
            if not shared:
                for c in others:
                    c.close(f"client {self.peer} asked for exclusive access")
            elif any(c.exclusive for c in others):
                self.close("asked to share the display while a client has it exclusively")
                return 1
        elif policy == "force-shared" and not shared:
            self.close("asked for exclusive access (share = \"force-shared\")")
            return 1
        self.exclusive = not shared and policy == "allow-exclusive"
        self.server.refresh()                     # the size of the mode shown now
        t = self.server.tracker
        self.size = (t.width, t.height)
        name = self.server.desktop_name.encode()
        self.send(struct.pack(">HH", t.width, t.height) + self.fmt.pack()
                  + struct.pack(">I", len(name)) + name)
        self.state = "normal"
        self.server.first_client.set()
        log.info("vnc: client %s connected (RFB 3.%d)", self.peer, self.version)
        return 1

    def _on_normal(self, buf: bytearray) -> int:
        t = buf[0]
        if t == SET_PIXEL_FORMAT:
            if len(buf) < 20:
                return 0
            fmt = enc.PixelFormat.unpack(bytes(buf[4:20]))
            why = fmt.check()
            if why is not None:
                raise ClientError(f"unsupported pixel format: {why}")
            self.fmt = fmt
            self.dirty = self.server.tracker.all_tiles()
            self.scroll = 0
            return 20
        if t == SET_ENCODINGS:
            if len(buf) < 4:
                return 0
            n = struct.unpack_from(">H", buf, 2)[0]
            if len(buf) < 4 + 4 * n:
                return 0
            count = min(n, MAX_ENCODINGS)
            self._set_encodings(list(struct.unpack_from(f">{count}i", buf, 4)))
            return 4 + 4 * n
        if t == FB_UPDATE_REQUEST:
            if len(buf) < 10:
                return 0
            incremental, x, y, w, h = struct.unpack_from(">BHHHH", buf, 1)
            if not incremental:
                self.server.refresh()             # the newest frame, not the last tick's
                self.dirty |= self._tiles_of(x, y, w, h)
            elif not self.dirty and time.monotonic() - self.server.last_refresh >= \
                    REFRESH_INTERVAL:
                self.server.refresh()             # due anyway: no wait for the next tick
            self.wants_update = True
            self.maybe_send_update()
            self.server._kick()
            return 10
        if t == KEY_EVENT:
            if len(buf) < 8:
                return 0
            down, key = struct.unpack_from(">B2xI", buf, 1)
            self._key(key, bool(down))
            return 8
        if t == POINTER_EVENT:
            if len(buf) < 6:
                return 0
            mask, x, y = struct.unpack_from(">BHH", buf, 1)
            self._pointer(mask, x, y)
            return 6
        if t == CUT_TEXT:
            if len(buf) < 8:
                return 0
            n = struct.unpack_from(">I", buf, 4)[0]
            if n > MAX_CUT_TEXT:
                raise ClientError(f"cut text of {n} bytes (over {MAX_CUT_TEXT})")
            if len(buf) < 8 + n:
                return 0
            return 8 + n                          # the guest has no clipboard: dropped
        if t == SET_DESKTOP_SIZE:
            if len(buf) < 8:
                return 0
            screens = buf[6]
            if len(buf) < 8 + 16 * screens:
                return 0
            self._desktop_size_reply(reason=1, status=1)   # prohibited: the guest decides
            return 8 + 16 * screens
        if t == QEMU_CLIENT:
            if len(buf) < 2:
                return 0
            if buf[1] != 0:
                raise ClientError(f"unknown QEMU client message {buf[1]}")
            if len(buf) < 12:
                return 0
            down, _keysym, keycode = struct.unpack_from(">HII", buf, 2)
            code = xt_to_evdev(keycode)
            if code is not None:
                self.server.hub.key(code, bool(down))
            return 12
        raise ClientError(f"unknown message type {t}")

    def _set_encodings(self, encs: list[int]) -> None:
        if enc.EXTENDED_DESKTOP_SIZE in encs and enc.EXTENDED_DESKTOP_SIZE not in \
                self.encodings:
            self.resize_pending = True          # tells the client the server does it
        self.encodings = encs
        if enc.QEMU_EXTENDED_KEY in encs and not self.ext_key_ack:
            self.ext_key_ack = True
            self.send(struct.pack(">BxH", 0, 1) + enc.rect_header(0, 0, 0, 0,
                                                                     enc.QEMU_EXTENDED_KEY))

    @property
    def resizable(self) -> bool:
        return enc.DESKTOP_SIZE in self.encodings or enc.EXTENDED_DESKTOP_SIZE in self.encodings

    def _tiles_of(self, x: int, y: int, w: int, h: int) -> set[int]:
        t = self.server.tracker
        x1, y1 = min(x + w, t.width), min(y + h, t.height)
        if x >= x1 or y >= y1:
            return set()
        tx_n = t.tiles_x
        return {ty * tx_n + tx for ty in range(y // TILE, (y1 - 1) // TILE + 1)
                for tx in range(x // TILE, (x1 - 1) // TILE + 1)}

    # -- updates -------------------------------------------------------------------------------
    def frame_changed(self, change: Change) -> None:
        if self.state != "normal":
            return
        if change.resized:
            self.dirty = self.server.tracker.all_tiles()
            self.scroll = 0
            self.resize_pending = True
            return
        if change.scroll and not self.dirty and not self.scroll and \
                enc.COPYRECT in self.encodings:
            self.scroll = change.scroll
            self.dirty = set(change.residual)
            return
        self.dirty |= change.tiles

    def maybe_send_update(self) -> None:
        if self.closed or self.state != "normal" or not self.wants_update or \
                len(self.outbuf) >= SEND_LOW_WATER:
            return
        if not (self.dirty or self.scroll or self.resize_pending):
            return
        self.wants_update = False
        update = self._build_update()
        self.send(update)
        self.server.updates_sent += 1
        self.server.bytes_sent += len(update)

    def _build_update(self) -> bytes:
        t = self.server.tracker
        rects: list[bytes] = []
        if self.resize_pending:
            self.resize_pending = False
            if enc.EXTENDED_DESKTOP_SIZE in self.encodings:
                self.size = (t.width, t.height)
                rects.append(self._ext_desktop_rect(0, 0))
            elif enc.DESKTOP_SIZE in self.encodings:
                self.size = (t.width, t.height)
                rects.append(enc.rect_header(0, 0, t.width, t.height, enc.DESKTOP_SIZE))
        cw, ch = min(self.size[0], t.width), min(self.size[1], t.height)
        if self.scroll:
            k = self.scroll
            self.scroll = 0
            if k < ch:
                rects.append(enc.rect_header(0, 0, cw, ch - k, enc.COPYRECT)
                             + enc.encode_copyrect(0, k))
        tiles, self.dirty = self.dirty, set()
        encoding = self._encoding()
        for x, y, w, h in _tile_runs(tiles, t.tiles_x, cw, ch):
            rects.append(self._encode(x, y, w, h, encoding))
        return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)

    def _encoding(self) -> int:
        for e in self.encodings:
            if e in (enc.RAW, enc.ZRLE, enc.ZLIB):
                return e
        return enc.RAW

    def _encode(self, x: int, y: int, w: int, h: int, encoding: int) -> bytes:
        t = self.server.tracker
        pixels = t.rect(x, y, w, h)
        head = enc.rect_header(x, y, w, h, encoding)
        if encoding == enc.ZRLE:
            return head + enc.encode_zrle(pixels, w, h, self.fmt, t.big_endian,
                                          self.zrle_stream)
        if encoding == enc.ZLIB:
            return head + enc.encode_zlib(pixels, self.fmt, t.big_endian, self.zlib_stream)
        return head + enc.encode_raw(pixels, self.fmt, t.big_endian)

    def _ext_desktop_rect(self, reason: int, status: int) -> bytes:
        t = self.server.tracker
        body = struct.pack(">B3xIHHHHI", 1, 0, 0, 0, t.width, t.height, 0)
        return enc.rect_header(reason, status, t.width, t.height,
                               enc.EXTENDED_DESKTOP_SIZE) + body

    def _desktop_size_reply(self, reason: int, status: int) -> None:
        if enc.EXTENDED_DESKTOP_SIZE in self.encodings:
            self.send(struct.pack(">BxH", 0, 1) + self._ext_desktop_rect(reason, status))

    # -- input -----------------------------------------------------------------------------------
    def _key(self, keysym: int, down: bool) -> None:
        hub = self.server.hub
        if keysym in SHIFT_KEYSYMS:
            self.shift = down
        if not down:
            code = self.pressed.pop(keysym, None)
            if code is None:
                mapped = keysym_to_evdev(keysym)
                code = mapped[0] if mapped else None
            if code is not None:
                hub.key(code, False)
            return
        mapped = keysym_to_evdev(keysym)
        if mapped is None:
            return
        code, shifted = mapped
        self.pressed[keysym] = code
        if shifted and not self.shift:
            hub.key(KEY_LEFTSHIFT, True)
            hub.key(code, True)
            hub.key(KEY_LEFTSHIFT, False)
        elif not shifted and self.shift and keysym < 0x100 and chr(keysym).isalnum():
            hub.key(KEY_LEFTSHIFT, False)
            hub.key(code, True)
            hub.key(KEY_LEFTSHIFT, True)
        else:
            hub.key(code, True)

    def _pointer(self, mask: int, x: int, y: int) -> None:
        hub = self.server.hub
        t = self.server.tracker
        buttons = (mask & 1) | (2 if mask & 4 else 0) | (4 if mask & 2 else 0)
        pressed = mask & ~self.buttons
        wheel = (1 if pressed & 8 else 0) - (1 if pressed & 16 else 0)
        self.buttons = mask
        x, y = min(x, t.width - 1), min(y, t.height - 1)
        if hub.has_tablet:
            hub.abs(x * ABS_MAX // max(1, t.width - 1), y * ABS_MAX // max(1, t.height - 1),
                    wheel, buttons)
        else:
            dx, dy = x - self.pointer[0], y - self.pointer[1]
            hub.rel(dx, dy, wheel, buttons)
        self.pointer = (x, y)


def _tile_runs(tiles: set[int], tiles_x: int, width: int, height: int):
    """Dirty tiles as rectangles: horizontal runs of tiles in each tile row, clipped."""
    rows: dict[int, list[int]] = {}
    for t in tiles:
        rows.setdefault(t // tiles_x, []).append(t % tiles_x)
    for ty in sorted(rows):
        y = ty * TILE
        if y >= height:
            continue
        h = min(TILE, height - y)
        xs = sorted(rows[ty])
        start = prev = xs[0]
        for tx in [*xs[1:], None]:
            if tx is not None and tx == prev + 1:
                prev = tx
                continue
            x = start * TILE
            w = min((prev + 1) * TILE, width) - x
            if w > 0:
                yield x, y, w, h
            if tx is not None:
                start = prev = tx
