"""The device's registers (dispi, QEMU extended, EDID), the RAM BAR it draws into, and the
frame tracker: tile comparison, the dirty-log path (against FakeVm's log), the check that
catches a KVM whose log misses writes, scrolls."""

from __future__ import annotations

import struct

import pytest
from vmrun_fbuf_vnc import fast
from vmrun_fbuf_vnc.display import VRAM_SIZE, BochsDisplay
from vmrun_fbuf_vnc.edid import build_edid, preferred_mode
from vmrun_fbuf_vnc.frame import FrameTracker

from plugins.fbuf_vnc.tests.fbufrig import BPP, ENABLE, SLOT, XRES, YRES, Rig


@pytest.fixture(params=["c", "python"])
def rig(request, monkeypatch):
    """Every tracker test runs with the C helper and with the pure Python path."""
    from vmrun_fbuf_vnc import fast

    if request.param == "c" and fast.lib is None:
        pytest.fail("the C helper did not build (a C compiler is needed)")
    if request.param == "python":
        monkeypatch.setattr(fast, "lib", None)
    r = Rig()
    yield r
    r.close()


def test_pci_identity_and_bars(rig: Rig) -> None:
    drv = rig.drv
    assert drv.scan()[(SLOT, 0)] == (0x1234, 0x1111)
    assert drv.read(SLOT, 0, 0x08) >> 8 == 0x038000
    assert drv.read(SLOT, 0, 0x08) & 0xFF == 2                       # revision: qext regs
    assert drv.read(SLOT, 0, 0x2C) == 0x1100_1AF4                    # QEMU's subsystem ids
    assert drv.bar_size(SLOT, 0, 0) == VRAM_SIZE >= 1920 * 1200 * 4
    assert drv.read(SLOT, 0, 0x10) & 0xF == 0x8                      # prefetchable mem32
    assert drv.bar_size(SLOT, 0, 2) == 0x1000
    assert rig.dev.ram_bars[0].slot in rig.vm.memslots              # a memory slot


def test_dispi_registers(rig: Rig) -> None:
    assert rig.dispi(0) == 0xB0C5
    assert rig.dispi(10) == VRAM_SIZE >> 16                          # VIDEO_MEMORY_64K
    rig.dispi(0, 0x1234)                                             # ID is read-only
    assert rig.dispi(0) == 0xB0C5
    rig.set_mode(800, 600)
    assert (rig.dispi(XRES), rig.dispi(YRES), rig.dispi(BPP), rig.dispi(ENABLE)) == \
        (800, 600, 32, 0x41)
    m = rig.dev.mode()
    assert (m.width, m.height, m.stride, m.offset) == (800, 600, 3200, 0)
    # 32-bit reads see two registers; byte reads a lane; odd/byte writes are ignored.
    assert rig.vm.mmio.read(rig.mmio + 0x502, 4) == 800 | 600 << 16
    assert rig.vm.mmio.read(rig.mmio + 0x503, 1) == 800 >> 8
    rig.vm.mmio.write(rig.mmio + 0x502, 1, 0xFF)
    assert rig.dispi(XRES) == 800
    assert rig.vm.mmio.read(rig.mmio + 0x500 + 2 * 11, 2) == 0xFFFF  # past the registers
    rig.set_mode(1024, 768, y_offset=768)                            # a page flip
    assert rig.dev.mode().offset == 768 * 4096


def test_modes_the_display_refuses(rig: Rig) -> None:
    rig.set_mode(800, 600)
    rig.dispi(BPP, 16)
    assert rig.dev.mode() is None                                    # 32 bpp only
    rig.set_mode(2048, 1200)
    assert rig.dev.mode() is None                                    # over 1920x1200
    rig.set_mode(1920, 1200, y_offset=1200)                          # past the framebuffer
    assert rig.dev.mode() is None
    rig.set_mode(1920, 1200)
    assert rig.dev.mode() is not None
    rig.dispi(ENABLE, 0)
    assert rig.dev.mode() is None
    rig.dev.reset()
    assert rig.dispi(XRES) == 0


def test_qemu_extended_registers(rig: Rig) -> None:
    mmio = rig.vm.mmio
    assert mmio.read(rig.mmio + 0x600, 4) == 8
    assert mmio.read(rig.mmio + 0x604, 4) == 0x1E1E1E1E
    mmio.write(rig.mmio + 0x604, 4, 0xBEBEBEBE)
    assert mmio.read(rig.mmio + 0x604, 4) == 0xBEBEBEBE
    rig.set_mode(640, 480)
    assert rig.dev.mode().big_endian
    mmio.write(rig.mmio + 0x604, 4, 0x1E1E1E1E)
    assert not rig.dev.mode().big_endian
    assert mmio.read(rig.mmio + 0x400, 1) == 0                       # VGA ports: ignored
    mmio.write(rig.mmio + 0x400, 1, 0x20)


def test_edid_in_the_mmio_bar() -> None:
    r = Rig(w=1280, h=800)
    try:
        blob = bytes(r.vm.mmio.read(r.mmio + i, 1) for i in range(128))
        assert blob[:8] == b"\x00\xff\xff\xff\xff\xff\xff\x00"
        assert sum(blob) % 256 == 0
        assert (blob[18], blob[19]) == (1, 4)
        assert preferred_mode(blob) == (1280, 800)
        assert r.vm.mmio.read(r.mmio + 0x80, 4) == 0                  # no extension blocks
        assert r.vm.mmio.read(r.mmio + 0x3FC, 4) == 0
        assert r.vm.mmio.read(r.mmio + 0x0, 4) == 0xFFFFFF00
    finally:
        r.close()


@pytest.mark.parametrize("w,h", [(640, 480), (1024, 768), (1920, 1200), (1366, 768)])
def test_edid_blocks(w: int, h: int) -> None:
    e = build_edid(w, h)
    assert len(e) == 128 and sum(e) % 256 == 0
    assert preferred_mode(e) == (w, h)
    clock = struct.unpack_from("<H", e, 54)[0]
    assert 2000 < clock < 65535                                      # 10 kHz units
    assert e[0x48 + 3] == 0xFD and e[0x5A + 3] == 0xFC               # range limits, name
    assert b"vmrun fbuf" in e


# -- the frame tracker -----------------------------------------------------------------------
def _tracker(rig: Rig, dirty_log: bool) -> FrameTracker:
    t = FrameTracker(1024, 768, dirty_log=dirty_log)
    assert t.use_c == (fast.lib is not None)
    t.attach(rig.dev)
    return t


@pytest.mark.parametrize("dirty_log", [False, True])
def test_changed_tiles(rig: Rig, dirty_log: bool) -> None:
    rig.set_mode(1024, 768)
    t = _tracker(rig, dirty_log)
    first = t.refresh()
    assert not first.tiles and not first.resized                     # all black, as before
    rig.fill(10, 10, 5, 5, 0x00FF0000)                               # tile (0, 0)
    rig.fill(700, 500, 100, 2, 0x0000FF00)                           # tiles (10..12, 7)
    c = t.refresh()
    assert c.tiles == {0, 7 * 16 + 10, 7 * 16 + 11, 7 * 16 + 12}
    assert t.refresh().tiles == set()
    assert bytes(t.shadow) == rig.frame()
    if dirty_log:
        # Only the rows of logged pages were compared on the second look.
        assert t.dirty_log_trusted


def test_dirty_log_path_compares_only_logged_rows(rig: Rig) -> None:
    rig.set_mode(1024, 768)
    t = _tracker(rig, True)
    t.refresh()
    t._verify = 0                                  # past the start-up check
    t.refreshes = 1                                # and not on an audit
    before = t.rows_compared
    rig.fill(0, 100, 8, 1, 0xFFFFFF)
    assert t.refresh().tiles == {1 * 16 + 0}
    assert t.rows_compared - before == 1           # page 100 = row 100 (stride 4096)
    # A write the log did not see stays unseen (that is what trusting it means) ...
    rig.fill(0, 300, 8, 1, 0xFFFFFF, mark=False)
    assert t.refresh().tiles == set()
    # ... until the once-a-second audit finds it, and stops trusting the log.
    t.refreshes = 29
    assert t.refresh().tiles == {4 * 16}
    assert not t.dirty_log_trusted


def test_a_dirty_log_that_misses_writes_is_caught(rig: Rig, caplog) -> None:
    rig.set_mode(1024, 768)
    t = _tracker(rig, True)
    t.refresh()
    rig.fill(0, 300, 8, 1, 0xFFFFFF, mark=False)                     # kvm-pvm: nothing logged
    with caplog.at_level("INFO", logger="vmrun.fbuf"):
        assert t.refresh().tiles == {4 * 16}
    assert not t.dirty_log_trusted
    assert "dirty page log missed" in caplog.text
    rig.fill(0, 400, 8, 1, 0xFFFFFF, mark=False)
    assert t.refresh().tiles == {6 * 16}                              # compared from now on


def test_mode_change_and_page_flip(rig: Rig) -> None:
    rig.set_mode(1024, 768)
    t = _tracker(rig, False)
    t.refresh()
    rig.set_mode(800, 600)
    c = t.refresh()
    assert c.resized and (t.width, t.height) == (800, 600) and c.tiles == t.all_tiles()
    rig.set_mode(800, 600, y_offset=600)                             # flip to a drawn page
    rig.fill(0, 0, 800, 600, 0x123456)
    c = t.refresh()
    assert not c.resized and c.tiles == t.all_tiles()
    assert bytes(t.shadow) == rig.frame()
    rig.dispi(ENABLE, 0)                                             # blanked
    c = t.refresh()
    assert c.tiles == t.all_tiles() and not any(t.shadow)


def test_scroll_is_recognised(rig: Rig) -> None:
    rig.set_mode(640, 480)
    t = FrameTracker(640, 480)
    assert t.use_c == (fast.lib is not None)
    t.attach(rig.dev)
    for line in range(30):                                           # text-like rows
        rig.fill(8 * (line % 7), 16 * line, 40 + line * 3, 8, 0xC0C0C0 + line)
    t.refresh()
    old = rig.frame()
    # Scroll up by one text line (16 rows) and draw a new bottom line.
    w4 = 640 * 4
    rig.dev.vram[0:w4 * 464] = old[16 * w4:480 * w4]
    rig.dev.vram[w4 * 464:w4 * 480] = bytes(w4 * 16)
    rig.fill(0, 470, 100, 6, 0xFFFFFF)
    c = t.refresh()
    assert c.scroll == 16
    assert c.residual == {70, 71, 72}          # the bottom line (old line 29 reached x=135)
    assert len(c.tiles) > len(c.residual)
    assert bytes(t.shadow) == rig.frame()


def test_detached_display_keeps_a_black_frame() -> None:
    dev = BochsDisplay()
    t = FrameTracker(1024, 768)
    assert t.refresh().tiles == set()
    t.attach(dev)                                   # not on a bus: no RAM BAR yet
    assert t.refresh().tiles == set()
