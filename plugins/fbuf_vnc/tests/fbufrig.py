"""A test rig: a FakeVm with an fbuf device, a guest-like driver for its registers, and a VNC
server on a free port of the loopback interface."""

from __future__ import annotations

import struct

from vmrun_fbuf_vnc.display import BochsDisplay
from vmrun_fbuf_vnc.rfb import VncServer

from vmrun.testing import FakeVm, PciDriver

SLOT = 5
DISPI = 0x500
XRES, YRES, BPP, ENABLE, VIRT_WIDTH, X_OFFSET, Y_OFFSET = 1, 2, 3, 4, 6, 8, 9


class Sink:
    """Records what the input hub delivers."""

    def __init__(self, tablet: bool = True) -> None:
        self.keys: list[tuple[int, bool]] = []
        self.rel: list[tuple[int, int, int, int]] = []
        self.abs: list[tuple[int, int, int, int]] = []
        if tablet:
            self.input_abs = lambda x, y, wheel, buttons: self.abs.append((x, y, wheel, buttons))

    def input_key(self, code: int, down: bool) -> None:
        self.keys.append((code, down))

    def input_rel(self, dx: int, dy: int, wheel: int, buttons: int) -> None:
        self.rel.append((dx, dy, wheel, buttons))


class Rig:
    def __init__(self, *, password: str | None = None, dirty_log: bool = False,
                 listen: str = "127.0.0.1:0", w: int = 1024, h: int = 768,
                 fbuf: bool = False, share: str = "allow-exclusive") -> None:
        """``fbuf``: the plugin's device (attaches itself to the server), else the bare
        display the test attaches."""
        from vmrun_fbuf_vnc.plugin import FbufDevice

        self.vm = FakeVm()
        self.server = VncServer(self.vm.loop, self.vm.host.input, listen=listen,
                                password=password, width=w, height=h, dirty_log=dirty_log,
                                share=share)
        self.dev = FbufDevice(self.server, w, h) if fbuf else BochsDisplay(w, h)
        self.vm.pci.add(self.dev, SLOT)
        self.vm.pci.assign_bars()
        self.drv = PciDriver(self.vm)
        self.mmio = self.drv.bar_address(SLOT, 0, 2)
        self.fb_addr = self.drv.bar_address(SLOT, 0, 0)
        self.server.attach(self.dev)
        self.address = self.server.address
        self.mode: tuple[int, int, int] | None = None

    def dispi(self, reg: int, value: int | None = None) -> int:
        if value is not None:
            self.vm.mmio.write(self.mmio + DISPI + 2 * reg, 2, value)
        return self.vm.mmio.read(self.mmio + DISPI + 2 * reg, 2)

    def set_mode(self, w: int, h: int, y_offset: int = 0, virt_width: int | None = None) -> None:
        """What Linux's bochs_hw_setmode + setbase write."""
        self.dispi(ENABLE, 0)
        self.dispi(BPP, 32)
        self.dispi(XRES, w)
        self.dispi(YRES, h)
        self.dispi(VIRT_WIDTH, virt_width or w)
        self.dispi(X_OFFSET, 0)
        self.dispi(Y_OFFSET, y_offset)
        self.dispi(ENABLE, 0x41)
        self.mode = (w, h, y_offset)
        self.stride = (virt_width or w) * 4

    def put(self, x: int, y: int, pixels: bytes, *, mark: bool = True) -> None:
        """The guest writes a row of pixels (XRGB little endian) at (x, y)."""
        w, h, yo = self.mode
        off = (yo + y) * self.stride + x * 4
        self.dev.vram[off:off + len(pixels)] = pixels
        if mark:
            self.vm.mark_dirty(self.fb_addr + off, len(pixels))

    def fill(self, x: int, y: int, w: int, h: int, colour: int, *, mark: bool = True) -> None:
        px = struct.pack("<I", colour) * w
        for r in range(y, y + h):
            self.put(x, r, px, mark=mark)

    def frame(self) -> bytes:
        """The visible frame, rows packed (what a client should show, server format)."""
        w, h, yo = self.mode
        return b"".join(bytes(self.dev.vram[(yo + r) * self.stride:(yo + r) * self.stride + w * 4])
                        for r in range(h))

    def close(self) -> None:
        self.server.close()
        self.server.detach(self.dev)
        self.vm.close()
