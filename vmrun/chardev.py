"""Serial-port backends: where a UART's bytes go and where its input comes from.

``stdio`` is the interactive console: the terminal in raw mode, Ctrl-A x to quit, Ctrl-A
Ctrl-A for a literal Ctrl-A (as QEMU), the terminal restored on every way out. ``file`` writes
output to a file, ``socket`` listens on a unix socket (one client at a time), ``pty`` makes a
pseudo-terminal and says its name, ``null`` discards.

A backend outlives a VM reset: the UART of each boot is attached anew with :meth:`attach`
(and let go with :meth:`detach` when it ends). Output is written from the vCPU thread straight to
a non-blocking fd (a reader that does not keep up loses output; the guest never waits). Input
is read on the devices' event loop: each input fd (the socket backend's listening socket too)
is a loop source. When the UART cannot take everything read, the backend keeps the rest and
switches its source off, so further input waits in the kernel (the pty's or socket's buffer,
pushing back on the writer); the UART's ``on_rx_room`` hook says when the guest has drained
its backlog, and delivery resumes on the loop thread. While no UART is attached (between
boots) the source stays off the same way.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import termios
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vmrun.core.eventloop import EventLoop, ReadySource, Source
from vmrun.errors import VmrunError

log = logging.getLogger("vmrun.chardev")

CTRL_A = 0x01
ESCAPE_HELP = (b"\r\nC-a x    quit vmrun\r\nC-a b    send a BREAK (then a key: SysRq)\r\n"
               b"C-a C-a  send C-a\r\nC-a h    this help\r\n")
READ_CHUNK = 4096


class Sink(Protocol):
    """What a backend feeds input to (a UART).

    ``feed`` returns how many bytes it took. A sink that can refuse bytes has an
    ``on_rx_room`` attribute: the backend sets it to a callable (any thread, must not block)
    that the sink calls once there is room again after a refusal.
    """

    def feed(self, data: bytes) -> int: ...


class Backend:
    """Base: output to ``out_fd`` if set; input from :attr:`input_source` (a loop source),
    fed to the attached sink on the loop thread."""

    name = "null"

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.sink: Sink | None = None
        self.out_fd = -1
        self.on_quit: Callable[[], None] | None = None
        self.input_source: Source | ReadySource | None = None
        self._pending = bytearray()     # read, not yet taken by the sink (loop thread only)
        self._closed = False

    # -- the sink (any thread) -------------------------------------------------------------
    def attach(self, sink: Sink) -> None:
        """Feed input to ``sink`` from now on (a new boot's UART); held input goes to it."""
        self._unhook(self.sink)
        self.sink = sink
        if hasattr(sink, "on_rx_room"):
            sink.on_rx_room = self._room      # type: ignore[attr-defined]
        self.loop.call_soon(self._resume, owner=self)

    def detach(self) -> None:
        """No sink until the next :meth:`attach`: input waits (the boot has ended)."""
        sink, self.sink = self.sink, None
        self._unhook(sink)

    def _unhook(self, sink: Sink | None) -> None:
        if sink is not None and getattr(sink, "on_rx_room", None) == self._room:
            sink.on_rx_room = None            # type: ignore[attr-defined]

    def _room(self) -> None:
        """The sink has room again (called from the thread that drained it)."""
        if not self._closed:
            self.loop.call_soon(self._resume, owner=self)

    # -- output (the vCPU thread) -----------------------------------------------------------
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

    # -- input (the loop thread) ------------------------------------------------------------
    def _watch(self, fd: int) -> Source | ReadySource:
        """Make ``fd`` the input source; it starts off and is switched on by :meth:`_resume`
        once a sink can take input."""
        src = self.loop.add(fd, self._readable, owner=self, enabled=False)
        self.input_source = src
        return src

    def _readable(self, fd: int) -> None:
        src = self.input_source
        if src is None or src.fd != fd or self._closed:
            return
        if self.sink is None or self._pending:
            src.disable()                       # wait for attach() / on_rx_room
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("%s console input: %s", self.name, e)
            data = b""
        if not data:
            self._input_ended(src)
            return
        data = self._process(data)
        if data:
            self._pending += data
            if not self._flush():
                src.disable()

    def _process(self, data: bytes) -> bytes:
        """What of ``data`` goes to the guest (the stdio console handles escapes here)."""
        return data

    def _flush(self) -> bool:
        """Feed held input to the sink; True once none is left."""
        pending = self._pending
        if pending:
            sink = self.sink
            if sink is None or self._closed:
                return False
            n = sink.feed(bytes(pending))
            if n:
                del pending[:n]
        return not pending

    def _resume(self) -> None:
        """Deliver held input and, once it is all taken, read again."""
        if self._closed or self.sink is None:
            return
        if self._flush():
            src = self.input_source
            if src is not None:
                src.enable()

    def _input_ended(self, src: Source | ReadySource) -> None:
        """EOF (or an error) on the input fd: stop watching it; held input is still delivered."""
        src.remove()
        if self.input_source is src:
            self.input_source = None

    def fault(self, reason: str) -> None:
        """A loop callback of this backend raised (the event loop's guard): input stops."""
        log.error("serial backend %s: %s; console input stopped", self.name, reason)
        src = self.input_source
        if src is not None:
            self._input_ended(src)

    def close(self) -> None:
        self._closed = True
        self.detach()
        src = self.input_source
        if src is not None:
            src.remove()
            self.input_source = None


class NullBackend(Backend):
    name = "null"


class FileBackend(Backend):
    name = "file"

    def __init__(self, loop: EventLoop, path: Path) -> None:
        super().__init__(loop)
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


def _reopen_nonblocking(fd: int) -> int:
    """A non-blocking fd reading what ``fd`` reads. Through /proc a terminal or a pipe gets a
    file description of its own: O_NONBLOCK on stdin itself would switch the terminal's
    stdout too (one description) and stay set after vmrun. Anything else (a socket): a dup,
    left blocking (the loop reads it only when epoll says it is readable)."""
    try:
        return os.open(f"/proc/self/fd/{fd}",
                       os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)


#: True while the guest's last byte on vmrun's stdout did not end a line: vmrun's own messages
#: (on stderr, often the same terminal) then start a fresh line first (see
#: :func:`console_needs_newline`).
_stdout_mid_line = False


def console_needs_newline() -> bool:
    """Whether a message to stderr must begin with a newline to start a line of its own: the
    guest's console (on stdout) stopped mid-line and both streams go to one terminal. Asking
    counts as ending the line (the caller writes the newline)."""
    global _stdout_mid_line
    if not _stdout_mid_line:
        return False
    _stdout_mid_line = False
    try:
        return os.isatty(1) and os.isatty(2) and os.ttyname(1) == os.ttyname(2)
    except OSError:
        return False


class StdioBackend(Backend):
    """The controlling terminal (or plain stdin/stdout when they are not a terminal)."""

    name = "stdio"

    def write(self, data: bytes) -> None:
        global _stdout_mid_line
        if data:
            _stdout_mid_line = data[-1:] not in (b"\n", b"\r")
        super().write(data)

    def __init__(self, loop: EventLoop) -> None:
        super().__init__(loop)
        self.in_fd = sys.stdin.fileno() if sys.stdin is not None else -1
        self.out_fd = sys.stdout.fileno()
        self._saved: list | None = None
        self._escape = False
        self._read_fd = -1
        if self.in_fd >= 0 and os.isatty(self.in_fd):
            self._saved = termios.tcgetattr(self.in_fd)
            atexit.register(self.restore_terminal)
            tty.setraw(self.in_fd, termios.TCSANOW)     # keep what was typed ahead
        if self.in_fd >= 0:
            self._read_fd = _reopen_nonblocking(self.in_fd)
            self._watch(self._read_fd)

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

    def _input_ended(self, src: Source | ReadySource) -> None:
        super()._input_ended(src)
        self._close_read_fd()

    def _close_read_fd(self) -> None:
        if self._read_fd >= 0:
            try:
                os.close(self._read_fd)
            except OSError:
                pass
            self._read_fd = -1

    def restore_terminal(self) -> None:
        if self._saved is not None:
            try:
                termios.tcsetattr(self.in_fd, termios.TCSAFLUSH, self._saved)
            except termios.error:
                pass
            self._saved = None

    def close(self) -> None:
        super().close()
        self._close_read_fd()
        self.restore_terminal()


class PtyBackend(Backend):
    name = "pty"

    def __init__(self, loop: EventLoop, label: str) -> None:
        super().__init__(loop)
        master, slave = os.openpty()
        tty.setraw(slave)
        self.master = master
        self.slave = slave            # kept open so output does not fail before a client opens it
        self.path = os.ttyname(slave)
        self.out_fd = master
        os.set_blocking(master, False)
        print(f"vmrun: {label} is on {self.path}", file=sys.stderr)
        self._watch(master)

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

    def __init__(self, loop: EventLoop, path: Path) -> None:
        super().__init__(loop)
        self.path = path
        if path.exists():
            if not path.is_socket():
                raise VmrunError(f"{path}: exists and is not a socket; refusing to replace it")
            path.unlink()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.server.bind(str(path))
        except OSError as e:
            self.server.close()
            raise VmrunError(f"{path}: cannot listen on unix socket: {e.strerror}") from None
        self.server.listen(1)
        self.server.setblocking(False)
        self.client: socket.socket | None = None
        self.accept_source = loop.add(self.server.fileno(), self._accept, owner=self)

    def _accept(self, fd: int) -> None:
        if self._closed:
            return
        try:
            conn, _ = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("serial socket %s: accept: %s", self.path, e)
            return
        conn.setblocking(False)        # output never blocks the guest
        old, old_src = self.client, self.input_source
        self.client = conn
        self.out_fd = conn.fileno()
        if old_src is not None:
            old_src.remove()
            self.input_source = None
        if old is not None:
            old.close()
        self._watch(conn.fileno())
        self._resume()

    def close(self) -> None:
        super().close()
        self.accept_source.remove()
        self.out_fd = -1
        self.server.close()
        if self.client is not None:
            self.client.close()
            self.client = None
        try:
            self.path.unlink()
        except OSError:
            pass


def open_backend(label: str, backend: str, path: Path | None, loop: EventLoop) -> Backend:
    """The backend named ``backend`` (``stdio``, ``file``, ``socket``, ``pty``, else null);
    its input is served on ``loop``, which must be running (or run) for input to arrive."""
    if backend == "stdio":
        return StdioBackend(loop)
    if backend == "file":
        assert path is not None
        return FileBackend(loop, path)
    if backend == "socket":
        assert path is not None
        return SocketBackend(loop, path)
    if backend == "pty":
        return PtyBackend(loop, label)
    return NullBackend(loop)
