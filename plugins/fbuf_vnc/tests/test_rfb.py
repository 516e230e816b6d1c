"""The VNC server against the test client: handshakes (3.3, 3.7, 3.8; None and VNC auth,
wrong passwords), every encoding decoded back and compared with the guest's framebuffer,
mode changes reaching the client, several clients and a stalled one, keyboard and pointer
into the input hub, and hostile clients (hypothesis)."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrun_fbuf_vnc import encodings as enc
from vmrun_fbuf_vnc.client import AuthFailed, RfbClient
from vmrun_fbuf_vnc.rfb import MAX_CUT_TEXT

from plugins.fbuf_vnc.tests.fbufrig import Rig, Sink
from vmrun.api import ABS_MAX

RGBX_LE = enc.PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16).pack()   # vncdotool's
XRGB_BE = enc.PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0).pack()


@pytest.fixture
def rig():
    r = Rig()
    r.set_mode(1024, 768)
    yield r
    r.close()


def _pattern(rig: Rig) -> None:
    """Text-like content: a few colours per tile, some gradients, a solid block."""
    w, h, _ = rig.mode
    for y in range(0, h, 37):
        rig.fill(0, y, w, 3, 0x00AA5500 + y)
    rig.fill(100, 100, 300, 200, 0x00FF00FF)
    row = b"".join(struct.pack("<I", (x * 7) & 0xFFFFFF) for x in range(256))
    for y in range(400, 460):
        rig.put(512, y, row)


def _expected(rig: Rig, fmt: bytes | None) -> bytes:
    frame = rig.frame()
    if fmt is None:
        return frame
    return enc.convert(frame, enc.PixelFormat.unpack(fmt))


def _sync(c: RfbClient, rig: Rig) -> None:
    """Non-incremental requests until the client's copy is complete."""
    c.request(incremental=False)
    c.read_update()


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n",
                                     b"RFB 003.005\n", b"RFB 004.001\n", b"RFB 003.889\n"])
def test_handshake_without_password(rig: Rig, version: bytes) -> None:
    c = RfbClient(rig.address, version=version)
    w, h, fmt, name = c.handshake()
    assert (w, h) == (1024, 768)
    assert c.security == 1
    assert enc.PixelFormat.unpack(fmt) == enc.SERVER_FORMAT
    assert name == b"vmrun"
    c.close()


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
def test_vnc_authentication(version: bytes) -> None:
    r = Rig(password="s3cret!")
    try:
        c = RfbClient(r.address, version=version, password="s3cret!")
        c.handshake()
        assert c.security == 2
        c.close()
        c = RfbClient(r.address, version=version, password="wrong")
        with pytest.raises((AuthFailed, ConnectionError)) as e:
            c.handshake()
        if version == b"RFB 003.008\n":
            assert "authentication failed" in str(e.value)
        c.close()
        # A client that picks None when only VNC auth is offered is refused.
        if version != b"RFB 003.003\n":
            c = RfbClient(r.address, version=version)
            with pytest.raises((AuthFailed, ConnectionError)):
                c.handshake(security=1)
            c.close()
    finally:
        r.close()


def test_password_is_its_first_eight_bytes() -> None:
    r = Rig(password="12345678andmore")
    try:
        c = RfbClient(r.address, password="12345678")
        c.handshake()
        c.close()
    finally:
        r.close()


@pytest.mark.parametrize("helper", ["c", "python"])
@pytest.mark.parametrize("encoding", [enc.RAW, enc.ZLIB, enc.ZRLE])
@pytest.mark.parametrize("fmt", [None, RGBX_LE, XRGB_BE])
def test_encodings_decode_to_the_framebuffer(rig: Rig, encoding: int, fmt, helper: str,
                                             monkeypatch) -> None:
    from vmrun_fbuf_vnc import fast

    if helper == "python":
        monkeypatch.setattr(fast, "lib", None)
        rig.server.tracker.use_c = False
    elif fast.lib is None:
        pytest.fail("the C helper did not build (a C compiler is needed)")
    _pattern(rig)
    c = RfbClient(rig.address)
    c.handshake()
    if fmt is not None:
        c.set_pixel_format(fmt)
    c.set_encodings([encoding])
    _sync(c, rig)
    assert all(r[4] == encoding for r in c.rects)
    assert bytes(c.fb) == _expected(rig, fmt)
    # Incremental: only what changed is sent, and the copy stays exact.
    rig.fill(300, 600, 50, 20, 0x000000FF)
    c.request(incremental=True)
    c.read_update()
    assert sum(w * h for _x, _y, w, h, _e in c.rects) <= 2 * 64 * 64
    assert bytes(c.fb) == _expected(rig, fmt)
    c.close()


def test_slow_path_pixel_format(rig: Rig) -> None:
    rig.set_mode(128, 64)
    _pattern(rig)
    c = RfbClient(rig.address)
    c.handshake()
    rgb565 = enc.PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0).pack()
    c.set_pixel_format(rgb565)
    c.set_encodings([enc.RAW, enc.DESKTOP_SIZE])
    c.request(incremental=False)
    c.read_update()
    frame = rig.frame()
    expect = bytearray()
    for i in range(0, len(frame), 4):
        b, g, r = frame[i], frame[i + 1], frame[i + 2]
        expect += struct.pack("<H", (r * 31 // 255) << 11 | (g * 63 // 255) << 5 | b * 31 // 255)
    assert bytes(c.fb) == bytes(expect)
    c.close()


def test_copyrect_for_a_scroll(rig: Rig) -> None:
    rig.set_mode(640, 480)
    for line in range(30):
        rig.fill(8 * (line % 7), 16 * line, 40 + line * 3, 8, 0xC0C0C0 + line)
    c = RfbClient(rig.address)
    c.handshake()
    c.set_encodings([enc.ZRLE, enc.COPYRECT, enc.DESKTOP_SIZE])
    c.request(incremental=False)
    c.read_update()
    while (c.width, c.height) != (640, 480) or bytes(c.fb) != rig.frame():
        c.request(incremental=False)
        c.read_update()
    old = rig.frame()
    w4 = 640 * 4
    rig.dev.vram[0:w4 * 464] = old[16 * w4:480 * w4]
    rig.dev.vram[w4 * 464:w4 * 480] = bytes(w4 * 16)
    rig.fill(0, 470, 100, 6, 0xFFFFFF)
    c.request(incremental=True)
    c.read_update()
    assert c.rects[0][4] == enc.COPYRECT
    assert sum(1 for r in c.rects if r[4] == enc.ZRLE) <= 2
    assert bytes(c.fb) == rig.frame()
    c.close()


@pytest.mark.parametrize("pseudo", [enc.DESKTOP_SIZE, enc.EXTENDED_DESKTOP_SIZE])
def test_mode_change_reaches_the_client(rig: Rig, pseudo: int) -> None:
    c = RfbClient(rig.address)
    c.handshake()
    c.set_encodings([enc.RAW, pseudo])
    _sync(c, rig)
    rig.set_mode(800, 600)
    rig.fill(0, 0, 800, 600, 0x336699)
    for _ in range(10):
        c.request(incremental=True)
        c.read_update()
        if (c.width, c.height) == (800, 600) and bytes(c.fb) == rig.frame():
            break
    assert (c.width, c.height) == (800, 600)
    assert bytes(c.fb) == rig.frame()
    if pseudo == enc.EXTENDED_DESKTOP_SIZE:
        assert c.screens == [(0, 0, 800, 600)]
        # The client asks for a size: prohibited (the guest picks its mode).
        c.send(struct.pack(">BxHHBxIHHHHI", 251, 1024, 768, 1, 0, 0, 0, 1024, 768, 0))
        c.read_update()
        assert c.ext_status == (1, 1)
    c.close()


def test_clients_without_desktop_size_keep_their_size(rig: Rig) -> None:
    c = RfbClient(rig.address)
    c.handshake()
    c.set_encodings([enc.RAW])
    _sync(c, rig)
    rig.set_mode(800, 600)
    rig.fill(0, 0, 800, 600, 0x336699)
    c.request(incremental=True)
    c.read_update()
    assert (c.width, c.height) == (1024, 768)                # clipped, never past its frame


def test_several_clients_and_one_that_never_reads(rig: Rig) -> None:
    stalled = socket.create_connection(rig.address)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.recv(12)
    stalled.sendall(b"RFB 003.008\n")
    stalled.recv(2)
    stalled.sendall(b"\x01")
    stalled.recv(4)
    stalled.sendall(b"\x01")
    # Keeps asking for full updates and never reads one.
    stalled.sendall(struct.pack(">BxH3i", 2, 3, 0, 0, 0)
                    + struct.pack(">BBHHHH", 3, 0, 0, 0, 1024, 768) * 50)
    clients = [RfbClient(rig.address) for _ in range(3)]
    for i, c in enumerate(clients):
        c.handshake()
        c.set_encodings([[enc.RAW], [enc.ZRLE], [enc.ZLIB]][i])
        _sync(c, rig)
    for step in range(5):
        rig.fill(64 * step, 64 * step, 64, 64, 0xFF0000 + step)
        for c in clients:
            c.request(incremental=True)
            c.read_update()
            while bytes(c.fb) != rig.frame():
                c.request(incremental=True)
                c.read_update()
    stalled_client = [cl for cl in rig.server.clients if cl.outbuf]
    assert len(stalled_client) == 1
    # Its updates were coalesced: one full frame waits, not fifty.
    assert len(stalled_client[0].outbuf) < 2 * 1024 * 768 * 4
    for c in clients:
        c.close()
    stalled.close()


def test_keys_reach_the_input_hub(rig: Rig) -> None:
    sink = Sink()
    rig.vm.host.input.attach(sink)
    c = RfbClient(rig.address)
    c.handshake()
    for keysym in (ord("a"), ord("A"), ord("!"), 0xFF0D):
        c.key(keysym, True)
        c.key(keysym, False)
    c.key(0xFFE1, True)                                      # the client holds shift ...
    c.key(ord("B"), True)
    c.key(0xFFE1, False)
    c.key(ord("b"), False)                                   # ... and lets go out of order
    c.key(0x12345, True)                                     # no such key: nothing
    c.set_encodings([enc.RAW, enc.QEMU_EXTENDED_KEY])
    c.read_update()
    assert c.ext_key
    c.qemu_key(0x1E, True)                                   # XT scancode of A
    c.qemu_key(0xC8, True)                                   # E0 48: up arrow
    _sync(c, rig)
    assert sink.keys == [
        (30, True), (30, False),
        (42, True), (30, True), (42, False), (30, False),
        (42, True), (2, True), (42, False), (2, False),
        (28, True), (28, False),
        (42, True), (48, True), (42, False), (48, False),
        (30, True), (103, True)]


def test_pointer_absolute_with_a_tablet_relative_without(rig: Rig) -> None:
    tablet = Sink(tablet=True)
    hub = rig.vm.host.input
    hub.attach(tablet)
    c = RfbClient(rig.address)
    c.handshake()
    c.pointer(0, 1023, 767)
    c.pointer(1, 0, 0)                                       # left button
    c.pointer(8, 512, 384)                                   # wheel up
    c.pointer(0, 512, 384)
    _sync(c, rig)
    assert tablet.abs == [(ABS_MAX, ABS_MAX, 0, 0), (0, 0, 0, 1),
                          (512 * ABS_MAX // 1023, 384 * ABS_MAX // 767, 1, 0),
                          (512 * ABS_MAX // 1023, 384 * ABS_MAX // 767, 0, 0)]
    hub.detach(tablet)
    mouse = Sink(tablet=False)
    hub.attach(mouse)
    c.pointer(4, 522, 380)                                   # right button, moved
    c.pointer(16, 522, 380)                                  # wheel down
    _sync(c, rig)
    assert mouse.rel == [(10, -4, 0, 2), (0, 0, -1, 0)]
    c.close()


def test_unix_socket(tmp_path) -> None:
    path = str(tmp_path / "vnc.sock")
    r = Rig(listen=path)
    try:
        r.set_mode(640, 480)
        c = RfbClient(path)
        c.handshake()
        c.set_encodings([enc.RAW, enc.DESKTOP_SIZE])
        c.request(incremental=False)
        c.read_update()
        c.close()
    finally:
        r.close()
    assert not os.path.exists(path)


# -- hostile clients ---------------------------------------------------------------------------
def _connected(rig: Rig) -> socket.socket:
    s = socket.create_connection(rig.address, timeout=5)
    s.recv(12)
    s.sendall(b"RFB 003.008\n")
    s.recv(2)
    s.sendall(b"\x01")
    s.recv(4)
    s.sendall(b"\x01")
    s.recv(24 + 5)
    return s


def _closed_by_server(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, TimeoutError):
        return False
    return False


@pytest.mark.parametrize("message,why", [
    (b"\x07", "unknown message type 7"),
    (b"\x00\x00\x00\x00" + bytes([12, 8, 0, 1, 0, 7, 0, 7, 0, 3, 0, 3, 6, 0, 0, 0]),
     "unsupported pixel format"),
    (struct.pack(">BxxxI", 6, MAX_CUT_TEXT + 1), "cut text"),
    (b"\xff\x07", "unknown QEMU client message"),
])
def test_hostile_message_closes_only_that_client(rig: Rig, caplog, message: bytes,
                                                 why: str) -> None:
    good = RfbClient(rig.address)
    good.handshake()
    with caplog.at_level("WARNING", logger="vmrun.fbuf"):
        s = _connected(rig)
        s.sendall(message)
        assert _closed_by_server(s)
    lines = [r for r in caplog.records if why in r.getMessage()]
    assert len(lines) == 1
    good.set_encodings([enc.RAW])
    _sync(good, rig)
    assert bytes(good.fb) == rig.frame()


def test_client_count_is_bounded(rig: Rig, monkeypatch) -> None:
    from vmrun_fbuf_vnc import rfb

    monkeypatch.setattr(rfb, "MAX_CLIENTS", 2)
    a, b = RfbClient(rig.address), RfbClient(rig.address)
    a.handshake()
    b.handshake()
    c = socket.create_connection(rig.address, timeout=5)
    assert _closed_by_server(c)
    a.close()
    for _ in range(50):
        if len(rig.server.clients) < 2:
            break
        time.sleep(0.05)
    RfbClient(rig.address).handshake()


def test_bad_version_and_huge_encoding_lists(rig: Rig) -> None:
    s = socket.create_connection(rig.address, timeout=5)
    s.recv(12)
    s.sendall(b"GET / HTTP/1.1\r\n")
    assert _closed_by_server(s)
    s = _connected(rig)
    s.sendall(struct.pack(">BxH", 2, 65535) + struct.pack(">i", 0) * 65535)
    s.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, 16, 16))
    s.settimeout(5)
    head = s.recv(4)
    assert head[:1] == b"\x00"                              # still served: an update
    s.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, d: struct.pack(">BxH", 2, n) + d, st.integers(0, 65535),
              st.binary(max_size=256)),
    st.builds(lambda n: struct.pack(">BxxxI", 6, n), st.integers(0, 2**32 - 1)),
    st.builds(lambda m, x, y: struct.pack(">BBHH", 5, m, x, y), st.integers(0, 255),
              st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(lambda i, x, y, w, h: struct.pack(">BBHHHH", 3, i, x, y, w, h),
              st.integers(0, 255), st.integers(0, 65535), st.integers(0, 65535),
              st.integers(0, 65535), st.integers(0, 65535)),
), max_size=6))
def test_hostile_streams_never_hurt_the_server(shared_rig: Rig, chunks: list[bytes]) -> None:
    s = _connected(shared_rig)
    for chunk in chunks:
        try:
            s.sendall(chunk)
        except OSError:
            break
    s.close()
    good = RfbClient(shared_rig.address, timeout=5)
    good.handshake()
    good.set_encodings([enc.ZRLE])
    good.request(incremental=False, w=64, h=64)
    good.read_update()
    good.close()
    assert not shared_rig.vm.loop.faults


@pytest.fixture(scope="module")
def shared_rig():
    r = Rig()
    r.set_mode(640, 480)
    yield r
    r.close()


# -- snapshots -------------------------------------------------------------------------------
def test_a_snapshot_carries_the_mode_and_the_frame_to_a_fresh_display(tmp_path) -> None:
    """The dispi registers (a page-flipped 800x600 mode) through JSON, the framebuffer
    through the snapshot's RAM file (RAM BARs after guest RAM), into a fresh display with
    its own VNC server: the same mode reads back and a new client gets the whole frame."""
    import json
    from types import SimpleNamespace

    from vmrun import snapshot

    a, b = Rig(dirty_log=True), Rig(dirty_log=True)
    try:
        a.set_mode(800, 600, y_offset=600)
        _pattern(a)
        state = json.loads(json.dumps(a.vm.pci.save_state()))
        ram = tmp_path / "s.ram"
        snapshot._write_ram(SimpleNamespace(vm=a.vm, pci=a.vm.pci), ram)
        snapshot._read_ram(SimpleNamespace(vm=b.vm, pci=b.vm.pci), ram)
        b.vm.pci.load_state(state)
        b.mode, b.stride = a.mode, a.stride
        assert b.dev.mode() == a.dev.mode() and b.dispi(9) == 600      # Y_OFFSET
        assert b.dev.screen_rgb() == a.dev.screen_rgb()
        c = RfbClient(b.address)
        c.handshake()
        assert (c.width, c.height) == (800, 600)
        _sync(c, b)
        assert bytes(c.fb) == a.frame()
        c.close()
    finally:
        a.close()
        b.close()


def test_a_restored_fbuf_refreshes_a_client_already_connected(tmp_path) -> None:
    """The restored framebuffer is written by the host, which no dirty page log sees: the
    device has its server look at the whole frame again, so a client that was connected
    (here to the fresh display, in the same mode) gets the restored frame."""
    import json
    from types import SimpleNamespace

    from vmrun import snapshot

    a, b = Rig(), Rig(dirty_log=True, fbuf=True)
    try:
        a.set_mode(1024, 768)
        _pattern(a)
        b.set_mode(1024, 768)
        c = RfbClient(b.address)
        c.handshake()
        _sync(c, b)
        for _ in range(40):                     # past the tracker's checks of the log
            c.request(incremental=True)
            b.fill(0, 0, 1, 1, 0x10 + _)
            c.read_update()
        state = json.loads(json.dumps(a.vm.pci.save_state()))
        ram = tmp_path / "s.ram"
        snapshot._write_ram(SimpleNamespace(vm=a.vm, pci=a.vm.pci), ram)
        snapshot._read_ram(SimpleNamespace(vm=b.vm, pci=b.vm.pci), ram)
        b.vm.pci.load_state(state)
        c.request(incremental=True)
        c.read_update()
        assert bytes(c.fb) == a.frame()
        c.close()
    finally:
        a.close()
        b.close()


def test_a_display_state_of_another_version_is_refused(rig: Rig) -> None:
    state = rig.dev.device_state()
    state["version"] = 5
    with pytest.raises(ValueError, match="fbuf: state version 5, this vmrun has 1"):
        rig.dev.load_device_state(state)


def _live(c: RfbClient, rig: Rig) -> bool:
    """Does the server still serve ``c``? (an update arrives, or the socket was closed)"""
    try:
        _sync(c, rig)
        return True
    except (ConnectionError, OSError, struct.error, EOFError):
        return False


def test_an_exclusive_client_disconnects_the_others_by_default(rig: Rig, caplog) -> None:
    """RFB's shared flag (QEMU's default policy, allow-exclusive): a client asking for
    exclusive access (TigerVNC's viewer without -Shared) takes the display; a client asking
    to share while it holds it is turned away."""
    a, b = RfbClient(rig.address), RfbClient(rig.address)
    a.handshake()
    b.handshake()
    assert _live(a, rig) and _live(b, rig)
    x = RfbClient(rig.address)
    x.handshake(shared=False)
    assert _live(x, rig)
    assert not _live(a, rig) and not _live(b, rig)
    assert "asked for exclusive access" in caplog.text
    late = RfbClient(rig.address)
    with pytest.raises((ConnectionError, OSError, struct.error, EOFError)):
        late.handshake()                           # no ServerInit: closed instead
        _sync(late, rig)
    assert _live(x, rig)
    x.close()
    time.sleep(0.2)
    again = RfbClient(rig.address)                 # once it left, sharing works again
    again.handshake()
    assert _live(again, rig)
    for c in (a, b, late, again):
        c.close()


@pytest.mark.parametrize("share", ["force-shared", "ignore"])
def test_share_policies_that_keep_everybody(share: str) -> None:
    rig = Rig(share=share)
    rig.set_mode(1024, 768)
    try:
        a = RfbClient(rig.address)
        a.handshake()
        x = RfbClient(rig.address)
        if share == "force-shared":                # exclusive access is refused
            with pytest.raises((ConnectionError, OSError, struct.error, EOFError)):
                x.handshake(shared=False)
                _sync(x, rig)
        else:                                      # the flag is ignored: x shares
            x.handshake(shared=False)
            assert _live(x, rig)
        assert _live(a, rig)
        a.close()
        x.close()
    finally:
        rig.close()


def test_an_unknown_share_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="share: 'open' is not one of"):
        Rig(share="open")


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 150), h=st.integers(1, 150), colours=st.integers(1, 40),
       seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from([None, RGBX_LE, XRGB_BE]))
def test_zrle_of_any_rectangle_is_the_same_from_c_and_python(w, h, colours, seed, fmt) -> None:
    """The C helper walks a rectangle's tiles itself (edge tiles of any width and height):
    what it encodes decodes to what the Python path's encoding decodes to (palettes may be
    in another order), and every byte of the payload is used."""
    import random
    import zlib

    from vmrun_fbuf_vnc import fast

    if fast.lib is None:
        pytest.fail("the C helper did not build (a C compiler is needed)")
    rnd = random.Random(seed)
    palette = [rnd.getrandbits(24) for _ in range(colours)]
    run = rnd.choice([1, 3, 17])
    px = b"".join(struct.pack("<I", palette[(i // run) % colours] if rnd.random() < 0.9
                              else rnd.choice(palette)) for i in range(w * h))
    pf = enc.SERVER_FORMAT if fmt is None else enc.PixelFormat.unpack(fmt)

    def payload(lib) -> bytes:
        saved = fast.lib
        fast.lib = lib
        try:
            data = enc.encode_zrle(px, w, h, pf, False, zlib.compressobj(6))
        finally:
            fast.lib = saved
        return zlib.decompressobj().decompress(data[4:])

    def decoded(data: bytes) -> bytes:
        c = RfbClient.__new__(RfbClient)
        c.width, c.height, c.bpp = w, h, 4
        c.big_endian = fmt == XRGB_BE
        c.fb = bytearray(w * h * 4)
        c._zrle(0, 0, w, h, data)               # asserts that it used every byte
        return bytes(c.fb)

    assert decoded(payload(fast.lib)) == decoded(payload(None))
