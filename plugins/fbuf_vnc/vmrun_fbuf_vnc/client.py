"""A small RFB client, written from RFC 6143: the handshakes of 3.3, 3.7 and 3.8, VNC
authentication, and a decoder for every encoding the server sends (Raw, CopyRect, zlib,
ZRLE, DesktopSize, ExtendedDesktopSize) into its own copy of the frame. The tests compare
that copy with the guest's framebuffer; ``vmrun screenshot`` saves it as a PNG."""

from __future__ import annotations

import socket
import struct
import zlib

from vmrun_fbuf_vnc.des import vnc_response


class AuthFailed(Exception):
    pass


class RfbClient:
    def __init__(self, address, *, version: bytes = b"RFB 003.008\n",
                 password: str | None = None, timeout: float = 10.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.version = version
        self.password = password
        self.bpp = 4
        self.big_endian = False
        self.zlib = zlib.decompressobj()
        self.zrle = zlib.decompressobj()
        self.fb = bytearray()
        self.width = self.height = 0
        self.rects: list[tuple[int, int, int, int, int]] = []
        self.ext_key = False
        self.screens: list[tuple[int, int, int, int]] = []
        self.ext_status: tuple[int, int] | None = None

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    # -- handshake ---------------------------------------------------------------------
    def handshake(self, security: int | None = None,
                  shared: bool = True) -> tuple[int, int, bytes, bytes]:
        server_version = self.recv(12)
        assert server_version == b"RFB 003.008\n", server_version
        self.send(self.version)
        major, minor = int(self.version[4:7]), int(self.version[8:11])
        minor = 8 if major > 3 or minor >= 8 else 7 if minor == 7 else 3   # as servers do
        if minor >= 7:
            n = self.recv(1)[0]
            if n == 0:
                reason = self.recv(struct.unpack(">I", self.recv(4))[0])
                raise AuthFailed(reason.decode())
            types = list(self.recv(n))
            choice = security if security is not None else types[0]
            self.send(bytes([choice]))
        else:
            choice = struct.unpack(">I", self.recv(4))[0]
            if choice == 0:
                reason = self.recv(struct.unpack(">I", self.recv(4))[0])
                raise AuthFailed(reason.decode())
        self.security = choice
        if choice == 2:
            challenge = self.recv(16)
            self.send(vnc_response(self.password or "", challenge))
        if choice == 2 or minor >= 8:
            result = struct.unpack(">I", self.recv(4))[0]
            if result != 0:
                reason = b""
                if minor >= 8:
                    reason = self.recv(struct.unpack(">I", self.recv(4))[0])
                raise AuthFailed(reason.decode() or "failed")
        self.send(b"\x01" if shared else b"\x00")               # ClientInit: shared flag
        w, h = struct.unpack(">HH", self.recv(4))
        fmt = self.recv(16)
        name = self.recv(struct.unpack(">I", self.recv(4))[0])
        self.width, self.height = w, h
        self.bpp = fmt[0] // 8
        self.big_endian = bool(fmt[2])
        self.fb = bytearray(w * h * self.bpp)
        return w, h, fmt, name

    # -- messages ------------------------------------------------------------------------
    def set_pixel_format(self, fmt: bytes) -> None:
        self.send(b"\x00\x00\x00\x00" + fmt)
        self.bpp = fmt[0] // 8
        self.big_endian = bool(fmt[2])
        self.fb = bytearray(self.width * self.height * self.bpp)

    def set_encodings(self, encs: list[int]) -> None:
        self.send(struct.pack(f">BxH{len(encs)}i", 2, len(encs), *encs))

    def request(self, incremental: bool = True, x: int = 0, y: int = 0,
                w: int | None = None, h: int | None = None) -> None:
        self.send(struct.pack(">BBHHHH", 3, incremental, x, y,
                              self.width if w is None else w, self.height if h is None else h))

    def key(self, keysym: int, down: bool) -> None:
        self.send(struct.pack(">BBxxI", 4, down, keysym))

    def pointer(self, mask: int, x: int, y: int) -> None:
        self.send(struct.pack(">BBHH", 5, mask, x, y))

    def qemu_key(self, keycode: int, down: bool, keysym: int = 0) -> None:
        self.send(struct.pack(">BBHII", 255, 0, down, keysym, keycode))

    # -- updates ---------------------------------------------------------------------------
    def read_message(self) -> int:
        """Read one server message (decoding a framebuffer update); returns its type."""
        t = self.recv(1)[0]
        if t == 0:
            self._update()
        elif t == 2:
            pass                                                # bell
        elif t == 3:
            self.recv(3)
            self.recv(struct.unpack(">I", self.recv(4))[0])
        else:
            raise AssertionError(f"unknown server message {t}")
        return t

    def read_update(self) -> list[tuple[int, int, int, int, int]]:
        while self.read_message() != 0:
            pass
        return self.rects

    def _update(self) -> None:
        self.recv(1)
        n = struct.unpack(">H", self.recv(2))[0]
        self.rects = []
        for _ in range(n):
            x, y, w, h, e = struct.unpack(">HHHHi", self.recv(12))
            self.rects.append((x, y, w, h, e))
            if e == 0:
                self._put(x, y, w, h, self.recv(w * h * self.bpp))
            elif e == 1:
                sx, sy = struct.unpack(">HH", self.recv(4))
                rows = [self._get(sx, sy + r, w) for r in range(h)]
                for r, row in enumerate(rows):
                    self._put(x, y + r, w, 1, row)
            elif e == 6:
                data = self.zlib.decompress(self.recv(struct.unpack(">I", self.recv(4))[0]))
                assert len(data) == w * h * self.bpp
                self._put(x, y, w, h, data)
            elif e == 16:
                data = self.zrle.decompress(self.recv(struct.unpack(">I", self.recv(4))[0]))
                self._zrle(x, y, w, h, data)
            elif e == -223:
                self._resize(w, h)
            elif e == -308:
                count = self.recv(4)[0]
                self.screens = [struct.unpack(">IHHHHI", self.recv(16))[1:5]
                                for _ in range(count)]
                self.ext_status = (x, y)
                if x != 1:
                    self._resize(w, h)
            elif e == -258:
                self.ext_key = True
            else:
                raise AssertionError(f"unexpected encoding {e}")

    def _resize(self, w: int, h: int) -> None:
        self.width, self.height = w, h
        self.fb = bytearray(w * h * self.bpp)

    def _put(self, x: int, y: int, w: int, h: int, data: bytes) -> None:
        b = self.bpp
        assert x + w <= self.width and y + h <= self.height, (x, y, w, h)
        for r in range(h):
            o = ((y + r) * self.width + x) * b
            self.fb[o:o + w * b] = data[r * w * b:(r + 1) * w * b]

    def _get(self, x: int, y: int, w: int) -> bytes:
        o = (y * self.width + x) * self.bpp
        return bytes(self.fb[o:o + w * self.bpp])

    def _cpixel_size(self) -> int:
        return 3 if self.bpp == 4 else self.bpp

    def _cpixel(self, data: bytes) -> bytes:
        if self.bpp == 4:      # depth 24 in the low three bytes (the formats the tests use)
            return data + b"\0" if not self.big_endian else b"\0" + data
        return data

    def _zrle(self, x: int, y: int, w: int, h: int, data: bytes) -> None:
        pos = 0
        cs = self._cpixel_size()
        for ty in range(y, y + h, 64):
            th = min(64, y + h - ty)
            for tx in range(x, x + w, 64):
                tw = min(64, x + w - tx)
                sub = data[pos]
                pos += 1
                if sub == 0:
                    px = b"".join(self._cpixel(data[pos + i * cs:pos + (i + 1) * cs])
                                  for i in range(tw * th))
                    pos += tw * th * cs
                elif sub == 1:
                    px = self._cpixel(data[pos:pos + cs]) * (tw * th)
                    pos += cs
                elif 2 <= sub <= 16:
                    palette = [self._cpixel(data[pos + i * cs:pos + (i + 1) * cs])
                               for i in range(sub)]
                    pos += sub * cs
                    bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                    row_bytes = (tw * bits + 7) // 8
                    out = []
                    for _r in range(th):
                        row = data[pos:pos + row_bytes]
                        pos += row_bytes
                        value = int.from_bytes(row, "big")
                        total = row_bytes * 8
                        for i in range(tw):
                            idx = (value >> (total - (i + 1) * bits)) & ((1 << bits) - 1)
                            out.append(palette[idx])
                    px = b"".join(out)
                elif sub == 128 or sub >= 130:               # plain RLE, palette RLE
                    palette = []
                    if sub >= 130:
                        palette = [self._cpixel(data[pos + i * cs:pos + (i + 1) * cs])
                                   for i in range(sub - 128)]
                        pos += (sub - 128) * cs
                    out = []
                    left = tw * th
                    while left > 0:
                        if sub == 128:
                            colour = self._cpixel(data[pos:pos + cs])
                            pos += cs
                            run = True
                        else:
                            colour = palette[data[pos] & 0x7F]
                            run = bool(data[pos] & 0x80)
                            pos += 1
                        n = 1
                        if run:
                            while data[pos] == 255:
                                n += 255
                                pos += 1
                            n += data[pos]
                            pos += 1
                        out.append(colour * n)
                        left -= n
                    px = b"".join(out)
                else:
                    raise AssertionError(f"ZRLE subencoding {sub} is not defined")
                self._put(tx, ty, tw, th, px)
        assert pos == len(data), (pos, len(data))


def capture(address, password: str | None = None, timeout: float = 10.0) -> tuple[int, int,
                                                                                   bytes]:
    """Connect, take one full frame and leave: (width, height, RGB bytes)."""
    c = RfbClient(address, password=password, timeout=timeout)
    try:
        c.handshake()
        c.set_encodings([16, 0, -223])                  # ZRLE, Raw, DesktopSize
        c.request(incremental=False)
        c.read_update()
        while any(r[4] == -223 for r in c.rects):     # resized: ask again at the new size
            c.request(incremental=False)
            c.read_update()
        fb = bytes(c.fb)
        rgb = bytearray(len(fb) // 4 * 3)
        rgb[0::3], rgb[1::3], rgb[2::3] = fb[2::4], fb[1::4], fb[0::4]
        return c.width, c.height, bytes(rgb)
    finally:
        c.close()


def write_png(path, width: int, height: int, rgb: bytes) -> None:
    """A truecolour PNG (no Pillow needed): IHDR, one zlib IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\0" + rgb[y * width * 3:(y + 1) * width * 3] for y in range(height))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))
