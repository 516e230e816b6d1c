"""RFB pixel formats and rectangle encodings: Raw, CopyRect, zlib and ZRLE (RFC 6143 7.7,
and the community's ZRLE/zlib), from the frame's 32-bit pixels (guest byte order).

The common client formats (32 bits per pixel, 8-bit channels on byte boundaries: what
vncdotool, TigerVNC and noVNC ask for) are converted with byte-lane slice assignments (C
speed); any other format goes through a per-pixel path with a colour cache.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from vmrun_fbuf_vnc import fast

RAW, COPYRECT, RRE, HEXTILE, ZLIB, TIGHT, ZRLE = 0, 1, 2, 5, 6, 7, 16
DESKTOP_SIZE = -223
EXTENDED_DESKTOP_SIZE = -308
QEMU_EXTENDED_KEY = -258
LAST_RECT = -224
CURSOR = -239
ZRLE_TILE = 64


@dataclass(frozen=True)
class PixelFormat:
    bpp: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    STRUCT = struct.Struct(">BBBBHHHBBB3x")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.bpp, self.depth, self.big_endian, self.true_colour,
                                self.red_max, self.green_max, self.blue_max, self.red_shift,
                                self.green_shift, self.blue_shift)

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        (bpp, depth, be, tc, rm, gm, bm, rs, gs, bs) = cls.STRUCT.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), rm, gm, bm, rs, gs, bs)

    def check(self) -> str | None:
        """Why a client's format cannot be served (None: it can)."""
        if self.bpp not in (8, 16, 32):
            return f"{self.bpp} bits per pixel"
        if not self.true_colour:
            return "a colour map (only true colour is served)"
        for m, s in ((self.red_max, self.red_shift), (self.green_max, self.green_shift),
                     (self.blue_max, self.blue_shift)):
            if m & (m + 1) or m == 0 or s + m.bit_length() > self.bpp:
                return f"channel max {m} shift {s}"
        return None

    @property
    def bytes_per_pixel(self) -> int:
        return self.bpp // 8

    def lanes(self) -> tuple[int, int, int] | None:
        """Byte positions of red, green and blue in a pixel when this is a 32-bit format with
        8-bit channels on byte boundaries (the fast path), else None."""
        if self.bpp != 32 or (self.red_max, self.green_max, self.blue_max) != (255, 255, 255):
            return None
        shifts = (self.red_shift, self.green_shift, self.blue_shift)
        if any(s % 8 for s in shifts) or len(set(shifts)) != 3:
            return None
        return tuple((3 - s // 8) if self.big_endian else s // 8 for s in shifts)  # type: ignore

    def cpixel_lanes(self) -> tuple[int, int, int] | None:
        """ZRLE's compressed pixel: the three bytes of a 32-bit pixel that hold the colour
        (RFC 6143 7.7.6), or None when a CPIXEL is a whole pixel."""
        if self.bpp != 32 or self.depth > 24 or not self.true_colour:
            return None
        bits = 0
        for m, s in ((self.red_max, self.red_shift), (self.green_max, self.green_shift),
                     (self.blue_max, self.blue_shift)):
            bits |= m << s
        if bits < 1 << 24:                            # the least significant 3 bytes
            return (1, 2, 3) if self.big_endian else (0, 1, 2)
        if not bits & 0xFF:                           # the most significant 3 bytes
            return (0, 1, 2) if self.big_endian else (1, 2, 3)
        return None


SERVER_FORMAT = PixelFormat()                         # XRGB little endian: the guest's own


def convert(src: bytes, fmt: PixelFormat, big_endian_src: bool = False) -> bytes:
    """Guest pixels (32-bit XRGB, little endian or, with ``big_endian_src``, BGRX) in the
    client's pixel format."""
    r_in, g_in, b_in = (1, 2, 3) if big_endian_src else (2, 1, 0)
    lanes = fmt.lanes()
    if lanes is not None:
        if lanes == (r_in, g_in, b_in):
            return src
        out = bytearray(len(src))
        for lane, lane_in in zip(lanes, (r_in, g_in, b_in), strict=True):
            out[lane::4] = src[lane_in::4]
        return bytes(out)
    return _convert_slow(src, fmt, big_endian_src)


def _convert_slow(src: bytes, fmt: PixelFormat, big_endian_src: bool) -> bytes:
    n = len(src) // 4
    words = memoryview(src).cast("I") if not big_endian_src else \
        memoryview(bytes(_swap32(src))).cast("I")
    bpp = fmt.bytes_per_pixel
    order = "big" if fmt.big_endian else "little"
    rm, gm, bm = fmt.red_max, fmt.green_max, fmt.blue_max
    rs, gs, bs = fmt.red_shift, fmt.green_shift, fmt.blue_shift
    cache: dict[int, bytes] = {}
    out = bytearray()
    for i in range(n):
        v = words[i] & 0xFFFFFF
        px = cache.get(v)
        if px is None:
            r, g, b = v >> 16, (v >> 8) & 0xFF, v & 0xFF
            value = (r * rm // 255) << rs | (g * gm // 255) << gs | (b * bm // 255) << bs
            px = cache[v] = value.to_bytes(bpp, order)
        out += px
    return bytes(out)


def _swap32(src: bytes) -> bytearray:
    out = bytearray(len(src))
    for i in range(4):
        out[i::4] = src[3 - i::4]
    return out


def rect_header(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding)


def encode_raw(pixels: bytes, fmt: PixelFormat, big_endian_src: bool) -> bytes:
    return convert(pixels, fmt, big_endian_src)


def encode_copyrect(src_x: int, src_y: int) -> bytes:
    return struct.pack(">HH", src_x, src_y)


def encode_zlib(pixels: bytes, fmt: PixelFormat, big_endian_src: bool,
                stream: zlib._Compress) -> bytes:
    data = stream.compress(convert(pixels, fmt, big_endian_src)) + \
        stream.flush(zlib.Z_SYNC_FLUSH)
    return struct.pack(">I", len(data)) + data


def encode_zrle(pixels: bytes, w: int, h: int, fmt: PixelFormat, big_endian_src: bool,
                stream: zlib._Compress) -> bytes:
    """ZRLE: 64x64 tiles, each solid (1), packed palette (2..16 colours) or raw CPIXELs (0),
    all through the client's one zlib stream."""
    px = convert(pixels, fmt, big_endian_src)
    bpp = fmt.bytes_per_pixel
    cl = fmt.cpixel_lanes()
    if bpp == 4 and fast.lib is not None:
        # The C helper walks the tiles itself: one call per rectangle, no copy per tile.
        ntiles = -(-w // ZRLE_TILE) * -(-h // ZRLE_TILE)
        buf = bytearray(len(px) + ntiles)
        l0, l1, l2 = cl if cl is not None else (0, 1, 2)
        n = fast.lib.zrle_rect(fast.ffi.from_buffer(px), w, h, l0, l1, l2, cl is not None,
                               fast.ffi.from_buffer(buf))
        with memoryview(buf) as view:
            data = stream.compress(view[:n]) + stream.flush(zlib.Z_SYNC_FLUSH)
        return struct.pack(">I", len(data)) + data
    row_bytes = w * bpp
    out = bytearray()
    for ty in range(0, h, ZRLE_TILE):
        th = min(ZRLE_TILE, h - ty)
        for tx in range(0, w, ZRLE_TILE):
            tw = min(ZRLE_TILE, w - tx)
            a, b = tx * bpp, (tx + tw) * bpp
            if tw * bpp == row_bytes:
                tile = px[ty * row_bytes:(ty + th) * row_bytes]
            else:
                tile = b"".join(px[r * row_bytes + a:r * row_bytes + b]
                                for r in range(ty, ty + th))
            out += _zrle_tile(tile, tw, th, bpp, cl)
    data = stream.compress(bytes(out)) + stream.flush(zlib.Z_SYNC_FLUSH)
    return struct.pack(">I", len(data)) + data


def _cpixels(tile: bytes, bpp: int, cl: tuple[int, int, int] | None) -> bytes:
    if cl is None:
        return tile
    n = len(tile) // 4
    out = bytearray(n * 3)
    for i, lane in enumerate(cl):
        out[i::3] = tile[lane::4]
    return bytes(out)


_HEX = b"0123456789abcdef"


def _zrle_tile(tile: bytes, tw: int, th: int, bpp: int,
               cl: tuple[int, int, int] | None) -> bytes:
    first = tile[:bpp]
    if tile == first * (tw * th):
        return b"\x01" + _cpixels(first, bpp, cl)
    if bpp == 4:
        packed = _palette_tile(tile, tw, th, cl)
        if packed is not None:
            return packed
    return b"\x00" + _cpixels(tile, bpp, cl)


def _palette_tile(tile: bytes, tw: int, th: int,
                  cl: tuple[int, int, int] | None) -> bytes | None:
    """Packed palette (2..16 colours): indices packed 1, 2 or 4 bits a pixel, rows padded to
    a byte. Fast where one byte lane tells the colours apart (text: it nearly always does):
    the lane is translated to index digits and packed by int()/bytes.fromhex()."""
    colours = set(memoryview(tile).cast("I"))
    if len(colours) > 16:
        return None
    palette = sorted(colours)
    for lane in range(4):
        values = [(c >> (8 * lane)) & 0xFF for c in palette]
        if len(set(values)) == len(palette):
            break
    else:
        return None
    bits = 1 if len(palette) == 2 else 2 if len(palette) <= 4 else 4
    table = bytearray(range(256))
    for i, v in enumerate(values):
        table[v] = _HEX[i]
    digits = tile[lane::4].translate(bytes(table))
    out = bytearray([len(palette)])
    for c in palette:
        out += _cpixels(c.to_bytes(4, "little"), 4, cl)
    per_byte = 8 // bits
    pad = (-tw) % per_byte
    for r in range(th):
        row = digits[r * tw:(r + 1) * tw] + b"0" * pad
        if bits == 4:
            out += bytes.fromhex(row.decode())
        else:
            out += int(row, 1 << bits).to_bytes(len(row) // per_byte, "big")
    return bytes(out)
