"""An EDID 1.4 base block naming one preferred mode (what Linux's bochs driver reads from
the MMIO BAR and picks), plus the common smaller modes as established/standard timings."""

from __future__ import annotations

import struct

EDID_SIZE = 128
# Standard timings (width, aspect code, height): aspect 0 = 16:10, 1 = 4:3, 2 = 5:4, 3 = 16:9.
_STANDARD = ((1280, 2, 1024), (1440, 0, 900), (1600, 1, 1200), (1680, 0, 1050),
             (1920, 3, 1080), (1920, 0, 1200), (1280, 0, 800), (1366, 3, 768))


def _detailed_timing(w: int, h: int, refresh: int = 60) -> bytes:
    """A detailed timing descriptor with reduced-blanking-like porches."""
    hblank, hfront, hsync = 160, 48, 32
    vblank, vfront, vsync = 30, 3, 6
    clock = (w + hblank) * (h + vblank) * refresh // 10000           # 10 kHz units
    hmm, vmm = w * 254 // 960, h * 254 // 960                        # 96 dpi
    return struct.pack(
        "<H16B", clock,
        w & 0xFF, hblank & 0xFF, (w >> 8) << 4 | hblank >> 8,
        h & 0xFF, vblank & 0xFF, (h >> 8) << 4 | vblank >> 8,
        hfront & 0xFF, hsync & 0xFF, (vfront & 0xF) << 4 | (vsync & 0xF),
        (hfront >> 8) << 6 | (hsync >> 8) << 4 | (vfront >> 4) << 2 | vsync >> 4,
        hmm & 0xFF, vmm & 0xFF, (hmm >> 8) << 4 | vmm >> 8, 0, 0,
        0x1E)                                   # digital separate sync, +hsync +vsync


def _text_descriptor(tag: int, text: str) -> bytes:
    body = text.encode()[:13]
    if len(body) < 13:
        body += b"\n" + b" " * (12 - len(body))
    return bytes([0, 0, 0, tag, 0]) + body


def _range_limits() -> bytes:
    # 50-75 Hz vertical, 30-160 kHz horizontal, 330 MHz max pixel clock, no extra timing data.
    return bytes([0, 0, 0, 0xFD, 0, 50, 75, 30, 160, 33, 0, 0x0A]) + b" " * 6


def build_edid(width: int, height: int, name: str = "vmrun fbuf", serial: int = 0) -> bytes:
    """128 bytes: header, identity, digital input, the preferred mode ``width``×``height``."""
    e = bytearray(EDID_SIZE)
    e[0:8] = b"\x00\xff\xff\xff\xff\xff\xff\x00"
    mfg = "VMR"
    code = (ord(mfg[0]) - 64) << 10 | (ord(mfg[1]) - 64) << 5 | (ord(mfg[2]) - 64)
    struct.pack_into(">H", e, 8, code)
    struct.pack_into("<HI", e, 10, 0x1111, serial & 0xFFFFFFFF)
    e[16], e[17] = 1, 2024 - 1990
    e[18], e[19] = 1, 4                                     # EDID 1.4
    e[20] = 0xA5                                            # digital, 8 bpc, DisplayPort
    e[21], e[22] = max(1, width * 254 // 9600), max(1, height * 254 // 9600)   # cm
    e[23] = 120                                             # gamma 2.2
    e[24] = 0x06                                            # sRGB, preferred mode is native
    e[25:35] = b"\xee\x91\xa3\x54\x4c\x99\x26\x0f\x50\x54"    # sRGB chromaticity
    e[35:38] = b"\x21\x08\x00"                              # 640x480, 800x600, 1024x768 @60
    std = bytearray()
    for w, aspect, h in _STANDARD:
        if (w, h) != (width, height) and len(std) < 16:
            std += bytes([w // 8 - 31, aspect << 6 | 0])
    std += b"\x01\x01" * ((16 - len(std)) // 2)
    e[38:54] = std
    e[54:72] = _detailed_timing(width, height)
    e[72:90] = _range_limits()
    e[90:108] = _text_descriptor(0xFC, name)
    e[108:126] = _text_descriptor(0xFF, f"{serial:08d}")
    e[126] = 0                                              # no extension blocks
    e[127] = (-sum(e[:127])) & 0xFF
    return bytes(e)


def preferred_mode(edid: bytes) -> tuple[int, int]:
    """The first detailed timing's size (what a driver picks): for tests."""
    d = edid[54:72]
    return d[2] | (d[4] >> 4) << 8, d[5] | (d[7] >> 4) << 8
