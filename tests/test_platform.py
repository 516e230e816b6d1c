"""The shared device platform: event loop, guest DMA, block request queue, input hub, host
context."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrun.block import RawFile
from vmrun.block.queue import BlockQueue
from vmrun.core.dma import DmaDisabled, GuestDma, SgList
from vmrun.core.eventloop import EventLoop
from vmrun.core.host import HostContext
from vmrun.core.input import ABS_MAX, InputHub
from vmrun.core.memory import GuestError, GuestMemory
from vmrun.devices.i8042 import I8042
from vmrun.devices.ps2_input import Ps2InputSink, evdev_to_set2

MiB = 1 << 20


@pytest.fixture
def loop():
    lp = EventLoop("test")
    lp.start()
    yield lp
    lp.close()


@pytest.fixture
def mem():
    m = GuestMemory([(0, 4 * MiB)])
    yield m
    m.close()


class Owner:
    def __init__(self, name: str = "dev") -> None:
        self.name = name
        self.reasons: list[str] = []

    def fault(self, reason: str) -> None:
        self.reasons.append(reason)


# -- event loop ----------------------------------------------------------------------------
def test_fd_sources_call_soon_and_sync(loop: EventLoop) -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    got: list[int] = []
    threads: list[str] = []

    def ready(f: int) -> None:
        got.append(os.eventfd_read(f))
        threads.append(threading.current_thread().name)

    src = loop.add(fd, ready)
    os.eventfd_write(fd, 3)
    assert loop.sync()
    time.sleep(0.05)
    loop.sync()
    assert got == [3] and threads == ["test"]
    order: list[int] = []
    for i in range(100):
        loop.call_soon(order.append, i)
    loop.sync()
    assert order == list(range(100))
    src.remove()
    os.eventfd_write(fd, 1)
    loop.sync()
    assert got == [3]
    os.close(fd)


def test_a_source_can_be_switched_off_and_on(loop: EventLoop) -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    got = bytearray()
    src = loop.add(r, lambda f: got.extend(os.read(f, 100)), enabled=False)
    os.write(w, b"abc")
    time.sleep(0.05)
    loop.sync()
    assert got == b""                         # off: not read
    src.enable()
    deadline = time.monotonic() + 2
    while not got and time.monotonic() < deadline:
        time.sleep(0.005)
    assert got == b"abc"
    src.disable()
    os.write(w, b"d")
    time.sleep(0.05)
    assert got == b"abc"
    src.enable()
    deadline = time.monotonic() + 2
    while len(got) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert got == b"abcd"
    os.close(r)
    os.close(w)


def test_timers_fire_once_and_periodically_and_cancel(loop: EventLoop) -> None:
    fired: list[float] = []
    t = loop.timer(lambda: fired.append(time.monotonic()))
    start = time.monotonic()
    t.arm(0.05)
    end = time.monotonic() + 5
    while not fired and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(fired) == 1 and fired[0] - start >= 0.04      # once: not periodic
    t.arm(0.02, 0.02)
    end = time.monotonic() + 5
    while len(fired) < 5 and time.monotonic() < end:       # a busy host may be slow
        time.sleep(0.01)
    t.cancel()
    loop.sync()
    n = len(fired)
    assert n >= 5
    time.sleep(0.1)
    assert len(fired) == n
    t.close()


def test_a_raising_callback_breaks_only_its_owner(loop: EventLoop) -> None:
    bad, good = Owner("bad"), Owner("good")
    served: list[int] = []

    def boom(_fd: int) -> None:
        raise ValueError("guest garbage")

    fd_bad = os.eventfd(0, os.EFD_NONBLOCK)
    fd_good = os.eventfd(0, os.EFD_NONBLOCK)
    loop.add(fd_bad, lambda f: (os.eventfd_read(f), boom(f)), bad)
    loop.add(fd_good, lambda f: served.append(os.eventfd_read(f)), good)
    os.eventfd_write(fd_bad, 1)
    os.eventfd_write(fd_good, 1)
    loop.call_soon(lambda: 1 / 0, owner=good)
    time.sleep(0.05)
    loop.sync()
    assert len(bad.reasons) == 1 and "guest garbage" in bad.reasons[0]
    assert served == [1]
    assert len(good.reasons) == 1 and "ZeroDivisionError" in good.reasons[0]
    os.eventfd_write(fd_good, 2)                 # the loop still serves
    time.sleep(0.05)
    loop.sync()
    assert served == [1, 2]
    assert {name for name, _ in loop.faults} == {"bad", "good"}
    os.close(fd_bad)
    os.close(fd_good)


def test_run_once_without_a_thread() -> None:
    lp = EventLoop()
    try:
        out: list[int] = []
        lp.call_soon(out.append, 1)
        assert lp.run_once(0) == 1 and out == [1]
        assert lp.sync()                          # no thread: runs inline
    finally:
        lp.close()


# -- guest DMA -----------------------------------------------------------------------------
def test_sglist_checks_every_piece_and_drops_empty_ones(mem: GuestMemory) -> None:
    sg = SgList(mem, [(0x1000, 16), (0xDEAD_0000_0000, 0), (0x3000, 8)])
    assert sg.nbytes == 24 and sg.pieces == [(0x1000, 16), (0x3000, 8)]
    with pytest.raises(GuestError):
        SgList(mem, [(0x1000, 16), (4 * MiB - 4, 8)])        # crosses the end of RAM
    with pytest.raises(GuestError):
        SgList(mem, [(2**64 - 8, 8)])


def test_reader_and_writer(mem: GuestMemory) -> None:
    mem.write(0x1000, bytes(range(16)))
    mem.write(0x3000, bytes(range(100, 108)))
    r = SgList(mem, [(0x1000, 16), (0x3000, 8)]).reader()
    assert r.read_struct(struct.Struct("<IH")) == (0x03020100, 0x0504)
    r.skip(6)
    assert r.read(6) == bytes([12, 13, 14, 15, 100, 101])
    assert r.remaining == 6
    rest = r.take()
    assert rest.pieces == [(0x3002, 6)] and bytes(rest.views[0]) == bytes(range(102, 108))
    with pytest.raises(GuestError):
        r.read(1)
    w = SgList(mem, [(0x5000, 3), (0x6000, 5)]).writer()
    w.write(b"abcd")
    w.skip(1)
    w.write(b"xyz")
    assert mem.read(0x5000, 3) == b"abc" and mem.read(0x6000, 5) == b"d\0xyz"
    with pytest.raises(GuestError):
        w.write(b"!")
    assert w.done == 8


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.tuples(st.integers(0, 4 * MiB + 100), st.integers(0, 5000)),
                       max_size=8),
       cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_cursors_never_escape_their_pieces(pieces, cuts) -> None:
    m = GuestMemory([(0, 4 * MiB)])
    try:
        try:
            sg = SgList(m, pieces)
        except GuestError:
            assert any(n and a + n > 4 * MiB for a, n in pieces)
            return
        r = sg.reader()
        total = 0
        for c in cuts:
            try:
                part = r.take(c)
            except GuestError:
                assert c > sg.nbytes - total
                continue
            total += c
            for gpa, n in part.pieces:
                assert any(a <= gpa and gpa + n <= a + ln for a, ln in sg.pieces)
        assert r.remaining == sg.nbytes - total
    finally:
        m.close()


def test_guest_dma_obeys_bus_mastering(mem: GuestMemory) -> None:
    on = [True]
    dma = GuestDma(mem, lambda: on[0])
    dma.write(0x1000, b"ok")
    assert dma.read(0x1000, 2) == b"ok"
    on[0] = False
    for op in (lambda: dma.sg([(0x1000, 2)]), lambda: dma.read(0x1000, 2),
               lambda: dma.write(0x1000, b"no"), lambda: dma.view(0x1000, 2)):
        with pytest.raises(DmaDisabled):
            op()
    assert mem.read(0x1000, 2) == b"ok"


# -- block request queue -------------------------------------------------------------------
def _wait(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


@pytest.mark.parametrize("nocache", [False, True])
def test_block_queue_reads_writes_and_completes_on_the_loop(
        tmp_path: Path, mem: GuestMemory, loop: EventLoop, nocache: bool) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(range(256)) * 4096)
    bq = BlockQueue(RawFile(img, nocache=nocache), loop, workers=2)
    assert (bq.aio is not None) == nocache
    results: list[tuple[str, int, str]] = []
    done = lambda tag: lambda r: results.append((tag, r, threading.current_thread().name))  # noqa: E731
    mem.write(0x10000, b"\x5a" * 4096)
    bq.write(8192, SgList(mem, [(0x10000, 4096)]), done("w"))
    bq.submit()
    _wait(lambda: len(results) == 1)
    bq.read(8192, SgList(mem, [(0x20000, 2048), (0x30000, 2048)]), done("r"))
    bq.read(0, SgList(mem, [(0x40000, 100)]), done("odd"))     # unaligned: the workers
    bq.flush(done("f"))
    bq.submit()
    _wait(lambda: len(results) == 4)
    got = {tag: r for tag, r, _ in results}
    assert got == {"w": 4096, "r": 4096, "odd": 100, "f": 0}
    assert {t for _, _, t in results} == {"test"}             # every completion on the loop
    assert mem.read(0x20000, 2048) + mem.read(0x30000, 2048) == b"\x5a" * 4096
    assert bq.inflight == 0
    if nocache:
        assert bq.aio_submitted == 2
    bq.close()


class FailingDisk(RawFile):
    def readv(self, offset, bufs):
        raise OSError(errno.EIO, "media error")

    def flush(self):
        raise RuntimeError("backend bug")


def test_block_queue_every_request_completes_exactly_once(
        tmp_path: Path, mem: GuestMemory, loop: EventLoop) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    bq = BlockQueue(FailingDisk(img), loop, workers=2)
    results: list[int] = []
    bq.read(0, SgList(mem, [(0x1000, 512)]), results.append)
    bq.flush(results.append)
    _wait(lambda: len(results) == 2)
    assert sorted(results) == [-errno.EIO, -errno.EIO]
    assert bq.inflight == 0 and bq.drain(1)
    bq.close()


class SlowDisk(RawFile):
    def readv(self, offset, bufs):
        time.sleep(0.2)
        return super().readv(offset, bufs)


def test_block_queue_drain_waits_for_io_not_for_the_loop(tmp_path: Path,
                                                         mem: GuestMemory) -> None:
    """The loop is never started: drain still finishes once the I/O has (completions are
    queued for the loop), so a vCPU resetting a device waits only for the disk."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    lp = EventLoop()
    try:
        bq = BlockQueue(SlowDisk(img), lp, workers=4)
        for i in range(4):
            bq.read(i * 512, SgList(mem, [(0x1000 + i * 512, 512)]), lambda r: None)
        assert bq.inflight == 4
        start = time.monotonic()
        assert bq.drain(5)
        assert 0.15 < time.monotonic() - start < 2
        bq.close()
    finally:
        lp.close()


def test_read_only_backend_refuses_writes(tmp_path: Path, mem: GuestMemory,
                                          loop: EventLoop) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    bq = BlockQueue(RawFile(img, read_only=True), loop)
    out: list[int] = []
    bq.write(0, SgList(mem, [(0x1000, 512)]), out.append)
    _wait(lambda: out)
    assert out == [-errno.EROFS]
    bq.close()


def test_discard_is_part_of_the_backend_contract(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    with RawFile(img) as a:
        assert a.supports_discard
    with RawFile(img, read_only=True) as b:
        assert not b.supports_discard
    with RawFile(img, discard=False) as c:
        assert not c.supports_discard
        assert c.direct_io() is None


# -- input hub -----------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.keys: list[tuple[int, bool]] = []
        self.abs: list[tuple[int, int, int, int]] = []

    def input_key(self, code: int, down: bool) -> None:
        self.keys.append((code, down))

    def input_abs(self, x: int, y: int, wheel: int, buttons: int) -> None:
        self.abs.append((x, y, wheel, buttons))


def test_input_hub_routes_to_the_newest_sink_and_clamps() -> None:
    hub = InputHub()
    a, b = Recorder(), Recorder()
    hub.key(30, True)                        # nobody attached: dropped
    hub.attach(a)
    hub.key(30, True)
    hub.attach(b)
    hub.key(31, False)
    hub.abs(-5, ABS_MAX + 10, 1, 0xFF)
    assert a.keys == [(30, True)] and b.keys == [(31, False)]
    assert b.abs == [(0, ABS_MAX, 1, 7)] and hub.has_tablet
    hub.detach(b)
    hub.key(32, True)
    assert a.keys[-1] == (32, True)
    hub.key(0, True)
    hub.key(100000, True)
    assert len(a.keys) == 2


def test_input_hub_prefers_the_newest_sink_the_guest_listens_to() -> None:
    hub = InputHub()
    ps2, usb = Recorder(), Recorder()
    usb.input_active = False                 # a USB keyboard the guest has not configured
    hub.attach(ps2)
    hub.attach(usb)
    hub.key(30, True)
    hub.abs(1, 2)
    assert ps2.keys == [(30, True)] and not usb.keys and ps2.abs == [(1, 2, 0, 0)]
    hub.detach(ps2)
    usb.input_active = False
    assert not hub.has_tablet                # absolute positions would reach nobody
    hub.abs(3, 4)                            # no active tablet: the newest one still gets it
    assert usb.abs == [(3, 4, 0, 0)]
    usb.input_active = True
    hub.key(30, False)
    assert usb.keys == [(30, False)]


def test_list_options_and_capabilities_offset(tmp_path: Path) -> None:
    from vmrun.core.pci import ConfigSpace, PciDevice
    from vmrun.plugins.registry import DeviceType, Option, validate_options

    dtype = DeviceType("t", "t", lambda ctx, o: None,
                       [Option("devs", "list", "h", ["a"], choices=("a", "b"), max=2)])
    assert validate_options(dtype, {}, tmp_path) == {"devs": ["a"]}
    assert validate_options(dtype, {"devs": ["b", "a"]}, tmp_path) == {"devs": ["b", "a"]}
    for bad in ("a", ["c"], ["a", "a"], ["a", "b", "b"], [1]):
        with pytest.raises(ValueError):
            validate_options(dtype, {"devs": bad}, tmp_path)

    class Dev(PciDevice):
        capabilities_offset = 0x70

    cfg = ConfigSpace(Dev())
    assert cfg.add_capability(0x09, b"\0\0") == 0x70
    assert ConfigSpace(PciDevice()).add_capability(0x09, b"\0\0") == 0x40


def test_i8042_is_an_input_hub_sink() -> None:
    from vmrun.core.irq import RecordingIrqLine

    dev = I8042(RecordingIrqLine(), RecordingIrqLine(), on_reset=lambda: None)
    hub = InputHub()
    hub.attach(Ps2InputSink(dev))
    dev.write(0, 1, 0xF4)                    # keyboard: enable scanning
    while dev.read(4, 1) & 1:
        dev.read(0, 1)                       # the ACK
    hub.key(30, True)                        # KEY_A
    hub.key(30, False)
    got = []
    while dev.read(4, 1) & 1:
        got.append(dev.read(0, 1))
    assert got == [0x1E, 0x9E]               # set 1 after the 8042's translation
    assert evdev_to_set2(103, True) == b"\xe0\x75" and evdev_to_set2(200, True) == b""


def test_host_context_keeps_resources_across_boots() -> None:
    host = HostContext()
    made: list[int] = []

    class Res:
        closed = False

        def close(self) -> None:
            Res.closed = True

    first = host.get("net0:tap", lambda: made.append(1) or Res())
    again = host.get("net0:tap", lambda: made.append(2) or Res())
    assert first is again and made == [1]
    host.close()
    assert Res.closed


def test_a_regular_file_is_an_always_ready_source(loop: EventLoop, tmp_path: Path) -> None:
    """epoll refuses regular files (and /dev/null); the loop serves them anyway, while on."""
    f = tmp_path / "input"
    f.write_bytes(b"x" * 10)
    fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK)
    got = bytearray()

    def read(fd: int) -> None:
        data = os.read(fd, 3)
        got.extend(data)
        if not data:
            src.remove()

    src = loop.add(fd, read, enabled=False)
    loop.sync()
    assert got == b""
    src.enable()
    _wait(lambda: len(got) == 10)
    os.close(fd)


def test_block_queue_aio_with_many_pieces(tmp_path: Path, loop: EventLoop) -> None:
    """More pieces than a slot keeps inline (16) still go out as one vectored AIO request."""
    m = GuestMemory([(0, 4 * MiB)])
    img = tmp_path / "d.img"
    img.write_bytes(bytes(range(256)) * 4096)
    bq = BlockQueue(RawFile(img, nocache=True), loop)
    out: list[int] = []
    pieces = [(0x100000 + 2 * i * 4096, 4096) for i in range(20)]   # every other page
    bq.read(0, SgList(m, pieces), out.append)
    bq.submit()
    _wait(lambda: out)
    assert out == [20 * 4096] and bq.aio_submitted == 1
    got = b"".join(m.read(a, n) for a, n in pieces)
    assert got == img.read_bytes()[:20 * 4096]
    bq.close()
    m.close()
