"""Serial-port backends: where a UART's bytes go and where its input comes from.

``stdio`` is the interactive console: the terminal in raw mode, Ctrl-A x to quit, Ctrl-A
Ctrl-A for a literal Ctrl-A (as QEMU), the terminal restored on every way out. ``file`` writes
output to a file, ``socket`` listens on a unix socket (one client at a time), ``pty`` makes a
pseudo-terminal and says its name, ``null`` discards.

A backend outlives a VM reset: the UART of each boot is attached anew with :meth:`attach`.
Output is written from the vCPU thread straight to the fd; input is read on a thread of the
backend's own and fed to the UART, waiting while the guest's receive buffer is full.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vmrun.errors import VmrunError

CTRL_A = 0x01
ESCAPE_HELP = (b"\r\nC-a x    quit vmrun\r\nC-a b    send a BREAK (then a key: SysRq)\r\n"
               b"C-a C-a  send C-a\r\nC-a h    this help\r\n")


class Sink(Protocol):
    """What a backend feeds input to (a UART)."""

    def feed(self, data: bytes) -> int: ...


class Backend:
    """Base: output to ``out_fd`` if set, input read from ``in_fd`` on a thread."""

    name = "null"

    def __init__(self) -> None:
        self.sink: Sink | None = None
        self.out_fd = -1
        self.on_quit: Callable[[], None] | None = None
        self._closed = False

    def attach(self, sink: Sink) -> None:
        self.sink = sink

    def write(self, data: bytes) -> None:
        fd = self.out_fd
        if fd < 0:
            return
        try:
            while data:
                n = os.write(fd, data)
                data = data[n:]
        except BlockingIOError:
            pass  # a reader that does not keep up loses output, the guest is not blocked
        except OSError:
            self.out_fd = -1

    def _deliver(self, data: bytes) -> None:
        """Feed ``data`` to the current UART, waiting while its buffer is full."""
        while data and not self._closed:
            sink = self.sink
            if sink is None:
                time.sleep(0.05)
                continue
            n = sink.feed(data)
            data = data[n:]
            if data:
                time.sleep(0.005)

    def _start_reader(self, fd: int, process: Callable[[bytes], bytes] | None = None) -> None:
        def loop() -> None:
            while not self._closed:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    return
                if not data:
                    return
                if process is not None:
                    data = process(data)
                self._deliver(data)

        threading.Thread(target=loop, name=f"serial-{self.name}", daemon=True).start()

    def close(self) -> None:
        self._closed = True


class NullBackend(Backend):
    name = "null"


class FileBackend(Backend):
    name = "file"

    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            self.out_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                  0o644)
        except OSError as e:
            raise VmrunError(f"{path}: cannot open serial output file: {e.strerror}") from None

    def close(self) -> None:
        super().close()
        if self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1


class StdioBackend(Backend):
    """The controlling terminal (or plain stdin/stdout when they are not a terminal)."""

    name = "stdio"

    def __init__(self) -> None:
        super().__init__()
        self.in_fd = sys.stdin.fileno() if sys.stdin is not None else -1
        self.out_fd = sys.stdout.fileno()
        self._saved: list | None = None
        self._escape = False
        if self.in_fd >= 0 and os.isatty(self.in_fd):
            self._saved = termios.tcgetattr(self.in_fd)
            atexit.register(self.restore_terminal)
            tty.setraw(self.in_fd)
        if self.in_fd >= 0:
            self._start_reader(self.in_fd, self._process)

    def _process(self, data: bytes) -> bytes:
        """Handle the Ctrl-A escapes; returns what goes to the guest."""
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b == CTRL_A:
                    out.append(CTRL_A)
                elif b in (ord("x"), ord("X")):
                    if self.on_quit is not None:
                        self.on_quit()
                elif b in (ord("b"), ord("B")):
                    self._send_break()
                elif b in (ord("h"), ord("?")):
                    self.write(ESCAPE_HELP)
                continue
            if b == CTRL_A:
                self._escape = True
                continue
            out.append(b)
        return bytes(out)

    def _send_break(self) -> None:
        brk = getattr(self.sink, "send_break", None)
        if brk is not None:
            brk()

    def restore_terminal(self) -> None:
        if self._saved is not None:
            try:
                termios.tcsetattr(self.in_fd, termios.TCSAFLUSH, self._saved)
            except termios.error:
                pass
            self._saved = None

    def close(self) -> None:
        super().close()
        self.restore_terminal()


class PtyBackend(Backend):
    name = "pty"

    def __init__(self, label: str) -> None:
        super().__init__()
        master, slave = os.openpty()
        tty.setraw(slave)
        self.master = master
        self.slave = slave            # kept open so output does not fail before a client opens it
        self.path = os.ttyname(slave)
        self.out_fd = master
        os.set_blocking(master, False)
        print(f"vmrun: {label} is on {self.path}", file=sys.stderr)
        self._start_reader_blocking()

    def _start_reader_blocking(self) -> None:
        def loop() -> None:
            import select

            while not self._closed:
                r, _, _ = select.select([self.master], [], [], 0.5)
                if not r:
                    continue
                try:
                    data = os.read(self.master, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                self._deliver(data)

        threading.Thread(target=loop, name="serial-pty", daemon=True).start()

    def close(self) -> None:
        super().close()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.out_fd = -1


class SocketBackend(Backend):
    """A unix socket that vmrun listens on; the newest client gets the console."""

    name = "socket"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        if path.exists():
            if not path.is_socket():
                raise VmrunError(f"{path}: exists and is not a socket; refusing to replace it")
            path.unlink()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.server.bind(str(path))
        except OSError as e:
            raise VmrunError(f"{path}: cannot listen on unix socket: {e.strerror}") from None
        self.server.listen(1)
        self.client: socket.socket | None = None
        threading.Thread(target=self._accept_loop, name="serial-socket", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            old = self.client
            self.client = conn
            self.out_fd = conn.fileno()
            if old is not None:
                old.close()
            self._start_reader(conn.fileno())

    def close(self) -> None:
        super().close()
        self.server.close()
        if self.client is not None:
            self.client.close()
        try:
            self.path.unlink()
        except OSError:
            pass


def open_backend(label: str, backend: str, path: Path | None) -> Backend:
    if backend == "stdio":
        return StdioBackend()
    if backend == "file":
        assert path is not None
        return FileBackend(path)
    if backend == "socket":
        assert path is not None
        return SocketBackend(path)
    if backend == "pty":
        return PtyBackend(label)
    return NullBackend()
