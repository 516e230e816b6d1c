"""The device: QEMU's ``bochs-display`` programming model (PCI 1234:1111, class 0380).

- BAR 0: the framebuffer, 16 MiB of host memory mapped into the guest as a KVM memory slot
  (a RAM BAR: drawing never exits);
- BAR 2: 4 KiB of registers — the EDID block at 0x000 (read-only), VGA ports 0x3c0..0x3df at
  0x400 (ignored: only the blanking bit Linux writes there), the bochs "dispi" registers at
  0x500 (16-bit, register index = (offset - 0x500) / 2), QEMU's extended registers at 0x600
  (0x600: their size, 8; 0x604: framebuffer byte order, 0x1e1e1e1e little / 0xbebebebe big).

The guest programs XRES, YRES, BPP (32), VIRT_WIDTH, X/Y_OFFSET and sets ENABLE; the
visible frame is then ``YRES`` rows of ``XRES`` pixels, ``VIRT_WIDTH * 4`` bytes apart,
starting at ``X_OFFSET * 4 + Y_OFFSET * stride`` in the framebuffer (as QEMU computes it).
Registers are state only: the display side (:class:`vmrun_fbuf_vnc.frame.FrameTracker`) reads
:meth:`BochsDisplay.mode` when it refreshes.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from vmrun.api import BAR_MEM32, BarSpec, PciDevice, check_version, versioned
from vmrun_fbuf_vnc.edid import EDID_SIZE, build_edid

log = logging.getLogger("vmrun.fbuf")

VRAM_SIZE = 16 << 20
MMIO_SIZE = 0x1000
MAX_WIDTH, MAX_HEIGHT = 1920, 1200
EDID_OFFSET, EDID_WINDOW = 0x000, 0x400
VGA_OFFSET = 0x400
DISPI_OFFSET = 0x500
QEXT_OFFSET, QEXT_SIZE = 0x600, 8

(ID, XRES, YRES, BPP, ENABLE, BANK, VIRT_WIDTH, VIRT_HEIGHT, X_OFFSET, Y_OFFSET,
 VIDEO_MEMORY_64K) = range(11)
DISPI_REGS = 11
DISPI_ID5 = 0xB0C5
ENABLED = 0x01
GETCAPS = 0x02
LFB_ENABLED = 0x40
NOCLEARMEM = 0x80
BYTEORDER_LITTLE, BYTEORDER_BIG = 0x1E1E1E1E, 0xBEBEBEBE


@dataclass(frozen=True)
class Mode:
    """What the guest shows: ``height`` rows of ``width`` 32-bit pixels, ``stride`` bytes apart
    from ``offset`` in the framebuffer; ``big_endian``: BGRX bytes instead of XRGB LE."""

    width: int
    height: int
    stride: int
    offset: int
    big_endian: bool = False


class BochsDisplay(PciDevice):
    vendor_id, device_id = 0x1234, 0x1111
    class_code = 0x038000                 # display controller, "other"
    revision = 2                          # >= 2: Linux looks for the QEMU extended registers
    subsystem_vendor_id, subsystem_id = 0x1AF4, 0x1100
    name = "fbuf"

    def __init__(self, width: int = 1024, height: int = 768, vram: int = VRAM_SIZE) -> None:
        self.bars = [BarSpec(0, vram, BAR_MEM32, prefetchable=True, ram=True),
                     BarSpec(2, MMIO_SIZE, BAR_MEM32)]
        self.vram_size = vram
        self.preferred = (width, height)
        self.edid = build_edid(width, height)
        self.regs = [0] * DISPI_REGS
        self.big_endian = False
        self.mode_changes = 0              # bumped on every register write that may change it
        self._reset_regs()

    def _reset_regs(self) -> None:
        self.regs = [0] * DISPI_REGS
        self.big_endian = False
        self.mode_changes += 1

    @property
    def vram(self) -> memoryview:
        return self.ram_bars[0].view

    # -- guest accesses to BAR 2 ----------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != 2:
            return (1 << (8 * size)) - 1
        if offset < EDID_WINDOW:
            chunk = self.edid[offset:offset + size] if offset < EDID_SIZE else b""
            return int.from_bytes(chunk.ljust(size, b"\0"), "little")
        if DISPI_OFFSET <= offset < DISPI_OFFSET + 2 * DISPI_REGS:
            value = 0
            for i in range(size):                 # any width: byte lanes of 16-bit registers
                o = offset - DISPI_OFFSET + i
                reg = o >> 1
                word = self._dispi_read(reg) if reg < DISPI_REGS else 0xFFFF
                value |= ((word >> (8 * (o & 1))) & 0xFF) << (8 * i)
            return value
        if QEXT_OFFSET <= offset < QEXT_OFFSET + QEXT_SIZE:
            regs = struct.pack("<II", QEXT_SIZE,
                               BYTEORDER_BIG if self.big_endian else BYTEORDER_LITTLE)
            o = offset - QEXT_OFFSET
            return int.from_bytes(regs[o:o + size].ljust(size, b"\0"), "little")
        if VGA_OFFSET <= offset < VGA_OFFSET + 0x20:
            return 0
        return (1 << (8 * size)) - 1

    def _dispi_read(self, reg: int) -> int:
        if reg == ID:
            return DISPI_ID5
        if reg == VIDEO_MEMORY_64K:
            return self.vram_size >> 16
        if reg == ENABLE and self.regs[ENABLE] & GETCAPS:
            return self.regs[ENABLE]
        return self.regs[reg]

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != 2:
            return
        if DISPI_OFFSET <= offset < DISPI_OFFSET + 2 * DISPI_REGS:
            if offset & 1 or size == 1:
                return                            # the registers are 16-bit (QEMU: min 2)
            for i in range(0, size, 2):
                reg = (offset - DISPI_OFFSET + i) >> 1
                if reg < DISPI_REGS:
                    self._dispi_write(reg, (value >> (8 * i)) & 0xFFFF)
        elif offset == QEXT_OFFSET + 4 and size == 4:
            if value == BYTEORDER_BIG:
                self.big_endian = True
            elif value == BYTEORDER_LITTLE:
                self.big_endian = False
            self.mode_changes += 1

    def _dispi_write(self, reg: int, value: int) -> None:
        if reg in (ID, VIDEO_MEMORY_64K):
            return
        self.regs[reg] = value
        self.mode_changes += 1

    # -- what the display side reads ---------------------------------------------------------
    def mode(self) -> Mode | None:
        """The visible mode, or None when the guest shows nothing (disabled, or a mode this
        display does not do: not 32 bpp, larger than 1920x1200, outside the framebuffer)."""
        r = self.regs
        if not r[ENABLE] & ENABLED or r[BPP] != 32:
            return None
        w, h = r[XRES], r[YRES]
        if not (64 <= w <= MAX_WIDTH and 64 <= h <= MAX_HEIGHT):
            return None
        stride = max(r[VIRT_WIDTH], w) * 4
        offset = r[X_OFFSET] * 4 + r[Y_OFFSET] * stride
        if offset + stride * (h - 1) + w * 4 > self.vram_size:
            return None
        return Mode(w, h, stride, offset, self.big_endian)

    def screen_rgb(self) -> tuple[int, int, bytes]:
        """The visible frame as 24-bit RGB rows (black 640x480 while the guest shows none)."""
        mode = self.mode()
        if mode is None:
            return 640, 480, bytes(640 * 480 * 3)
        vram = self.vram
        rows = []
        for r in range(mode.height):
            start = mode.offset + r * mode.stride
            px = bytes(vram[start:start + mode.width * 4])
            if mode.big_endian:                        # X R G B bytes
                rows.append(b"".join(px[i + 1:i + 4] for i in range(0, len(px), 4)))
            else:                                      # B G R X bytes
                out = bytearray(mode.width * 3)
                out[0::3], out[1::3], out[2::3] = px[2::4], px[1::4], px[0::4]
                rows.append(bytes(out))
        return mode.width, mode.height, b"".join(rows)

    # -- snapshots ---------------------------------------------------------------------------
    state_version = 1

    def device_state(self) -> dict:
        """The dispi registers (the mode) and the framebuffer byte order. The framebuffer's
        contents are the RAM BAR, which the snapshot saves with guest RAM; the EDID is
        configuration (the machine file's ``w``/``h``)."""
        return versioned(self.state_version, {"regs": self.regs,
                                              "big_endian": self.big_endian})

    def load_device_state(self, state: dict) -> None:
        f = check_version(self.name, state, self.state_version)
        if len(f["regs"]) != DISPI_REGS:
            raise ValueError(f"{self.name}: {len(f['regs'])} dispi registers saved")
        self.regs = list(f["regs"])
        self.big_endian = bool(f["big_endian"])
        self.mode_changes += 1

    def reset(self) -> None:
        self._reset_regs()
