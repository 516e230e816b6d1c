"""The serial backends on the devices' event loop, feeding a real 16550A that the test drives
through its registers as a guest would: input arrives, back-pressure holds input in the
kernel instead of dropping or spinning, the newest socket client owns the console, and input
typed between boots waits for the next boot's UART."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vmrun.chardev as chardev
from vmrun.chardev import Backend, PtyBackend, SocketBackend, StdioBackend, open_backend
from vmrun.core.eventloop import EventLoop
from vmrun.core.irq import RecordingIrqLine
from vmrun.devices import uart as u
from vmrun.devices.uart import Uart16550

TIMEOUT = 20.0     # generous: the machine may be busy


def wait_for(cond: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class Guest:
    """A UART and the register accesses of a polling guest driver."""

    def __init__(self, backend: Backend, rx_backlog: int = u.RX_BACKLOG,
                 fifo: bool = True) -> None:
        self.uart = Uart16550(RecordingIrqLine(), backend.write, rx_backlog=rx_backlog)
        if fifo:
            self.uart.write(u.FCR, 1, u.FCR_FIFO_ENABLE | 0xC0)

    def read_available(self, limit: int = 1 << 30) -> bytes:
        got = bytearray()
        while len(got) < limit and self.uart.read(u.LSR, 1) & u.LSR_DR:
            got.append(self.uart.read(u.RBR, 1))
        return bytes(got)

    def read_exactly(self, n: int, timeout: float = TIMEOUT) -> bytes:
        got = bytearray()
        deadline = time.monotonic() + timeout
        while len(got) < n:
            chunk = self.read_available(n - len(got))
            if chunk:
                got += chunk
                continue
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(got)} of {n} bytes: {bytes(got[:64])!r}")
            time.sleep(0.002)
        return bytes(got)

    def transmit(self, data: bytes) -> None:
        for b in data:
            self.uart.write(u.THR, 1, b)


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop("test-io")
    lp.start()
    yield lp
    lp.close()


@pytest.fixture
def pty(loop: EventLoop) -> Iterator[tuple[PtyBackend, int]]:
    backend = open_backend("com1", "pty", None, loop)
    assert isinstance(backend, PtyBackend)
    peer = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
    yield backend, peer
    backend.close()
    os.close(peer)


def read_peer(fd: int, n: int, timeout: float = TIMEOUT) -> bytes:
    import select

    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < n:
        r, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not r:
            raise AssertionError(f"peer got {bytes(got)!r}, wanted {n} bytes")
        got += os.read(fd, n - len(got))
    return bytes(got)


def test_no_polling_and_no_threads_left_in_chardev(tmp_path: Path, loop: EventLoop) -> None:
    source = Path(chardev.__file__).read_text()
    assert "time.sleep" not in source and "import time" not in source
    assert "threading.Thread" not in source
    before = set(threading.enumerate())
    backends = [open_backend("com1", "pty", None, loop),
                open_backend("com2", "socket", tmp_path / "s.sock", loop),
                open_backend("com3", "file", tmp_path / "out.log", loop),
                open_backend("com4", "null", None, loop)]
    try:
        assert set(threading.enumerate()) <= before      # nothing but the loop reads input
    finally:
        for b in backends:
            b.close()


def test_pty_input_reaches_the_uart_fifo_and_output_the_peer(pty) -> None:
    backend, peer = pty
    g = Guest(backend)
    backend.attach(g.uart)
    assert g.uart.on_rx_room is not None
    os.write(peer, b"hello, guest")
    assert g.read_exactly(12) == b"hello, guest"
    g.transmit(b"hi host")
    assert read_peer(peer, 7) == b"hi host"


def test_pty_back_pressure_keeps_every_byte_in_order(pty) -> None:
    backend, peer = pty
    g = Guest(backend, rx_backlog=512)
    backend.attach(g.uart)
    wakeups = 0
    resume = g.uart.on_rx_room
    assert resume is not None

    def counted() -> None:
        nonlocal wakeups
        wakeups += 1
        resume()

    g.uart.on_rx_room = counted
    data = bytes((i * 131 + (i >> 8)) & 0xFF for i in range(64 * 1024))
    written = threading.Event()

    def writer() -> None:          # blocks in write() while the pty's buffer is full
        view = memoryview(data)
        while view:
            view = view[os.write(peer, view[:8192]):]
        written.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    # The guest has not read yet: the UART's backlog fills (all but what moved on into the
    # FIFO) and the backend stops reading.
    src = backend.input_source
    assert src is not None
    wait_for(lambda: g.uart.rx_room() <= u.FIFO_SIZE and not src.enabled, "the backend to pause")
    assert not src.enabled
    # Paused means idle: nothing spins on the loop thread while the guest does not read.
    cpu = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu < 0.3
    assert not src.enabled and g.uart.rx_room() <= u.FIFO_SIZE

    got = bytearray()
    deadline = time.monotonic() + 120
    paused_again = False
    while len(got) < len(data):
        chunk = g.read_available(64)          # a slow guest: a few bytes, then other work
        got += chunk
        if not chunk:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(got)} of {len(data)} bytes")
            time.sleep(0.001)
        if not paused_again and len(got) >= len(data) // 2:
            # Half-way, stop reading once more: the backend pauses again, nothing is lost.
            # (Paused, the backlog stays above half: room is only reported below that.)
            wait_for(lambda: g.uart.rx_room() < 256 and not src.enabled, "a second pause")
            time.sleep(0.2)
            assert g.uart.rx_room() < 256 and not src.enabled
            paused_again = True
    assert bytes(got) == data
    t.join(TIMEOUT)
    assert written.is_set()
    # Woken once per drained half-backlog, not per byte.
    assert 0 < wakeups < len(data) // 100
    wait_for(lambda: src.enabled, "the backend to read again")


def test_detached_sink_between_boots_keeps_input_for_the_next_uart(pty) -> None:
    backend, peer = pty
    first = Guest(backend, rx_backlog=4, fifo=False)
    backend.attach(first.uart)
    os.write(peer, b"abcdefgh")
    src = backend.input_source
    assert src is not None
    wait_for(lambda: first.uart.rx_room() <= 1 and not src.enabled, "the first UART to fill")
    backend.detach()                              # the boot ends with input still pending
    assert first.uart.on_rx_room is None
    got_first = first.read_available()             # the old UART is not fed any more
    os.write(peer, b"ijkl")                        # typed between boots: waits
    time.sleep(0.2)
    assert not src.enabled and first.read_available() == b""

    second = Guest(backend)
    backend.attach(second.uart)
    rest = len(b"abcdefghijkl") - len(got_first)
    assert got_first + second.read_exactly(rest) == b"abcdefghijkl"
    os.write(peer, b"!")
    assert second.read_exactly(1) == b"!"


def test_detached_backend_does_not_read(pty) -> None:
    backend, peer = pty
    src = backend.input_source
    assert src is not None and not src.enabled     # no UART yet: not even watched
    os.write(peer, b"early")
    time.sleep(0.2)
    g = Guest(backend)
    backend.attach(g.uart)
    assert g.read_exactly(5) == b"early"


def test_socket_newest_client_gets_the_console(tmp_path: Path, loop: EventLoop) -> None:
    path = tmp_path / "com1.sock"
    backend = open_backend("com1", "socket", path, loop)
    assert isinstance(backend, SocketBackend)
    g = Guest(backend)
    backend.attach(g.uart)
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        a.connect(str(path))
        a.sendall(b"from a")
        assert g.read_exactly(6) == b"from a"
        g.transmit(b"to a")
        assert a.recv(16) == b"to a"

        b.connect(str(path))
        b.sendall(b"from b")
        assert g.read_exactly(6) == b"from b"
        assert a.recv(16) == b""                  # the older client was let go
        g.transmit(b"to b")
        assert b.recv(16) == b"to b"

        b.close()                                  # EOF: its source goes away
        wait_for(lambda: backend.input_source is None, "the source of a closed client")
    finally:
        a.close()
        b.close()
        backend.close()
    assert not path.exists()
    assert g.read_available() == b""


def test_socket_output_never_blocks_the_guest(tmp_path: Path, loop: EventLoop) -> None:
    path = tmp_path / "com1.sock"
    backend = open_backend("com1", "socket", path, loop)
    g = Guest(backend)
    backend.attach(g.uart)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect(str(path))
        c.sendall(b"x")
        g.read_exactly(1)                          # accepted
        done = threading.Event()

        def flood() -> None:                       # the client never reads
            backend.write(b"y" * (4 << 20))
            done.set()

        threading.Thread(target=flood, daemon=True).start()
        assert done.wait(TIMEOUT)
    finally:
        c.close()
        backend.close()


@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_stdio_escapes_and_eof(kind: str, tmp_path: Path, loop: EventLoop,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    # stdin from a pipe (epoll) or from a file (epoll refuses it: read until EOF via call_soon).
    typed = b"ab\x01\x01c\x01hd\x01x"
    if kind == "pipe":
        r, w = os.pipe()
        os.write(w, typed)
        os.close(w)
        stdin = os.fdopen(r, "rb")
    else:
        f = tmp_path / "in"
        f.write_bytes(typed)
        stdin = open(f, "rb")                      # noqa: SIM115
    stdout = open(tmp_path / "out", "wb")          # noqa: SIM115
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    quits = []
    try:
        backend = open_backend("com1", "stdio", None, loop)
        assert isinstance(backend, StdioBackend)
        backend.on_quit = lambda: quits.append(1)
        g = Guest(backend)
        backend.attach(g.uart)
        assert g.read_exactly(5) == b"ab\x01cd"      # C-a C-a is a C-a; C-a h, C-a x not
        wait_for(lambda: quits, "C-a x")
        wait_for(lambda: backend.input_source is None, "EOF to remove the source")
        backend.close()
    finally:
        stdin.close()
        stdout.close()
    assert g.read_available() == b""
    assert chardev.ESCAPE_HELP in (tmp_path / "out").read_bytes()
    assert quits == [1]


def test_close_removes_sources(tmp_path: Path, loop: EventLoop) -> None:
    pty = open_backend("com1", "pty", None, loop)
    sock = open_backend("com2", "socket", tmp_path / "s.sock", loop)
    assert isinstance(pty, PtyBackend) and isinstance(sock, SocketBackend)
    fds = [pty.master, sock.server.fileno()]
    assert all(fd in loop._sources for fd in fds)
    pty.close()
    sock.close()
    assert not any(fd in loop._sources for fd in fds)
    with pytest.raises(OSError):
        os.fstat(fds[0])
