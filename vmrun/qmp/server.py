"""The QMP server: a unix socket on the devices' event loop, commands on one control thread.

Every client socket is non-blocking and served on the :class:`~vmrun.core.eventloop.EventLoop`
(reads, writes, accepts), so no client can hold up a device or a vCPU. Commands are handed
to one control thread (in order; a handler may block for a moment without stalling the
loop) and their replies come back to the loop with ``call_soon``, behind any event the
command emitted (``STOP`` before the ``return`` of ``stop``, as QEMU).

Bounds, so that a hostile or stuck client costs little and never the VM:

- input: one JSON value of at most ``MAX_MESSAGE`` bytes and ``MAX_DEPTH`` levels; over
  that, one error and the client is dropped (:class:`~vmrun.qmp.protocol.JsonSplitter`);
- output: at most ``MAX_OUTPUT`` bytes queued for a client that does not read; over that the
  client is dropped (events are not worth the memory);
- commands: at most ``MAX_PENDING`` of one client waiting for the control thread; the
  server stops reading that client until they are answered (its kernel buffer fills, it
  blocks);
- clients: at most ``MAX_CLIENTS`` at once; one more gets an error line and is closed.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmrun.core.eventloop import READABLE, WRITABLE, EventLoop, Source
from vmrun.errors import VmrunError
from vmrun.qmp.protocol import (
    COMMAND_NOT_FOUND,
    MAX_DEPTH,
    MAX_MESSAGE,
    Command,
    FatalInput,
    JsonSplitter,
    QmpError,
    check_command,
    encode,
    error_reply,
    event,
    reply,
)
from vmrun.qmp.registry import QmpCommand, QmpContext

log = logging.getLogger("vmrun.qmp")

MAX_OUTPUT = 1 << 20
MAX_PENDING = 8
MAX_CLIENTS = 16
READ_CHUNK = 65536
UNIX_PATH_MAX = 107


class _Client:
    def __init__(self, server: QmpServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.splitter = JsonSplitter(server.max_message, server.max_depth)
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.negotiated = False
        self.pending = 0
        self.closing = False         # no more input (EOF, a fatal error): drop once answered
        self.closed = False
        self.source: Source | None = None


class QmpServer:
    """Listen on ``path`` (mode 0600) and serve ``commands`` against ``control``.

    ``control`` is what the commands drive (the runner, or a fake in tests); ``version`` the
    greeting's ``{"qemu": {...}, "package": ...}``. :meth:`emit` sends an event to every
    negotiated client, from any thread."""

    def __init__(self, path: Path, loop: EventLoop, commands: dict[str, QmpCommand],
                 control: Any, version: dict[str, Any], *, max_clients: int = MAX_CLIENTS,
                 max_output: int = MAX_OUTPUT, max_pending: int = MAX_PENDING,
                 max_message: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self.path = Path(path)
        self.loop = loop
        self.commands = commands
        self.control = control
        self.version = version
        self.max_clients, self.max_output, self.max_pending = max_clients, max_output, \
            max_pending
        self.max_message, self.max_depth = max_message, max_depth
        self.clients: dict[int, _Client] = {}
        self.dropped = 0              # clients dropped for a limit (tests, stats)
        self.name = "qmp"
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._accept_source: Source | None = None
        self._closed = False

    # -- set-up ---------------------------------------------------------------------------
    def start(self) -> None:
        path = self.path
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise VmrunError(f"{path}: unix socket paths are at most {UNIX_PATH_MAX} bytes")
        if path.is_symlink() or (path.exists() and not path.is_socket()):
            raise VmrunError(f"{path}: exists and is not a socket; refusing to replace it")
        if path.exists():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)         # the socket file is born 0600
        try:
            sock.bind(str(path))
        except OSError as e:
            sock.close()
            raise VmrunError(f"{path}: cannot listen on the control socket: "
                             f"{e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self._listener = sock
        self._thread = threading.Thread(target=self._control_thread, name="vmrun-qmp",
                                        daemon=True)
        self._thread.start()
        self._accept_source = self.loop.add(sock.fileno(), self._accept, owner=self)

    def fault(self, reason: str) -> None:
        """The loop's guard caught an exception of ours: log it; the VM goes on."""
        log.error("control socket: %s", reason)

    # -- the loop thread ------------------------------------------------------------------
    def _accept(self, fd: int) -> None:
        if self._listener is None:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("control socket: accept: %s", e)
            return
        conn.setblocking(False)
        if len(self.clients) >= self.max_clients:
            self.dropped += 1
            try:
                conn.send(encode(error_reply(QmpError(
                    f"too many QMP clients (at most {self.max_clients})"))))
            except OSError:
                pass
            conn.close()
            return
        client = _Client(self, conn)
        self.clients[client.fd] = client
        client.source = self.loop.add(client.fd, lambda _fd, c=client: self._serve(c),
                                      owner=self, events=READABLE)
        self._send(client, {"QMP": {"version": self.version, "capabilities": []}})

    def _serve(self, client: _Client) -> None:
        if client.closed:
            return
        self._flush(client)
        if client.closed or client.closing or client.pending >= self.max_pending:
            self._update_events(client)
            return
        try:
            data = client.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:             # EOF (or a half-close, as socat does): answer, then close
            client.closing = True
            self._flush(client)
            if not client.closed:
                self._update_events(client)
            return
        try:
            items = client.splitter.feed(data)
        except FatalInput as e:
            self._answer(client, error_reply(QmpError(f"{e}; closing the connection")))
            self.dropped += 1
            client.closing = True
            self._flush(client)
            if not client.closed:
                self._update_events(client)
            return
        for item in items:
            if client.closed:
                return
            if item.error is not None:
                self._answer(client, error_reply(QmpError(item.error)))
                continue
            self._command(client, item.value)
        if not client.closed:
            self._update_events(client)

    def _command(self, client: _Client, msg: Any) -> None:
        try:
            cmd = check_command(msg)
        except QmpError as e:
            has_id = isinstance(msg, dict) and "id" in msg
            self._answer(client, error_reply(e, msg_id=msg.get("id") if has_id else None,
                                           has_id=has_id))
            return
        if cmd.name == "qmp_capabilities":
            self._capabilities(client, cmd)
            return
        if not client.negotiated:
            self._answer(client, error_reply(QmpError(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                COMMAND_NOT_FOUND), cmd))
            return
        spec = self.commands.get(cmd.name)
        if spec is None:
            self._answer(client, error_reply(QmpError(
                f"The command {cmd.name[:80]} has not been found", COMMAND_NOT_FOUND), cmd))
            return
        try:
            kwargs = spec.check_args(cmd.arguments)
        except QmpError as e:
            self._answer(client, error_reply(e, cmd))
            return
        client.pending += 1
        self._work.put((client, cmd, spec, kwargs))

    def _capabilities(self, client: _Client, cmd: Command) -> None:
        if client.negotiated:
            self._answer(client, error_reply(QmpError(
                "Capabilities negotiation is already complete, command ignored",
                COMMAND_NOT_FOUND), cmd))
            return
        enable = cmd.arguments.get("enable", [])
        extra = set(cmd.arguments) - {"enable"}
        if extra:
            self._answer(client, error_reply(QmpError(
                f"Parameter '{sorted(extra)[0][:80]}' is unexpected"), cmd))
            return
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            self._answer(client, error_reply(QmpError(
                "Invalid parameter type for 'enable', expected: array of strings"), cmd))
            return
        if enable:
            self._answer(client, error_reply(QmpError(
                f"Capability '{enable[0][:80]}' not available"), cmd))
            return
        client.negotiated = True
        self._answer(client, reply({}, cmd))

    def _answer(self, client: _Client, msg: dict) -> None:
        """A reply made on the loop (an error, qmp_capabilities): sent at once unless
        commands before it are still with the control thread; then it queues behind them,
        so that every client gets its answers in the order it asked."""
        if client.pending == 0:
            self._send(client, msg)
        else:
            client.pending += 1
            self._work.put((client, None, msg, None))

    def _answered(self, client: _Client, msg: dict, after: list[Callable[[], None]]) -> None:
        client.pending -= 1
        if not client.closed:
            self._send(client, msg)
            if not client.closed:
                self._flush(client)          # a closing client goes once all is answered
            if not client.closed:
                self._update_events(client)
        for fn in after:
            fn()

    def _send(self, client: _Client, msg: dict) -> None:
        if client.closed:
            return
        data = encode(msg)
        if client.out_bytes + len(data) > self.max_output:
            log.warning("control socket: a client is not reading its replies: dropped")
            self.dropped += 1
            self._drop(client)
            return
        client.out.append(data)
        client.out_bytes += len(data)
        self._flush(client)
        if not client.closed and client.out:
            self._update_events(client)

    def _flush(self, client: _Client) -> None:
        out = client.out
        while out:
            try:
                n = client.sock.send(out[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(client)
                return
            client.out_bytes -= n
            if n == len(out[0]):
                out.popleft()
            else:
                out[0] = out[0][n:]
                return
        if client.closing and not client.pending:
            self._drop(client)

    def _update_events(self, client: _Client) -> None:
        src = client.source
        if src is None or client.closed:
            return
        events = 0
        if not client.closing and client.pending < self.max_pending:
            events |= READABLE
        if client.out:
            events |= WRITABLE
        if events == 0:
            src.disable()
        else:
            if src.events != events:
                src.modify(events)
            src.enable()

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self.clients.pop(client.fd, None)
        if client.source is not None:
            client.source.remove()
        client.out.clear()
        try:
            client.sock.close()
        except OSError:
            pass

    def _broadcast(self, msg: dict) -> None:
        for client in list(self.clients.values()):
            if client.negotiated:        # a half-closed client still reads (socat)
                self._send(client, msg)

    # -- any thread -------------------------------------------------------------------------
    def emit(self, name: str, data: dict | None = None) -> None:
        """Send event ``name`` (timestamped now) to every negotiated client."""
        if not self._closed:
            self.loop.call_soon(self._broadcast, event(name, data), owner=self)

    # -- the control thread ---------------------------------------------------------------
    def _control_thread(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            client, cmd, spec, kwargs = item
            if cmd is None:               # a ready answer, kept in order (_answer)
                self.loop.call_soon(self._answered, client, spec, [], owner=self)
                continue
            ctx = QmpContext(self.control, self.emit, self.loop, self.commands)
            try:
                msg = reply(spec.handler(ctx, **kwargs), cmd)
            except QmpError as e:
                msg = error_reply(e, cmd)
            except Exception as e:       # a bug in a handler: the VM goes on
                log.error("QMP command %s: internal error: %r", cmd.name, e, exc_info=True)
                msg = error_reply(QmpError(f"internal error: {type(e).__name__}: {e}"), cmd)
            self.loop.call_soon(self._answered, client, msg, ctx._after, owner=self)

    # -- the end ------------------------------------------------------------------------------
    def close(self, timeout: float = 2.0) -> None:
        """Deliver what is queued (events emitted before this call, e.g. SHUTDOWN) as far as
        the clients take it without blocking, then close every socket and remove the file."""
        if self._closed:
            return
        done = threading.Event()

        def finish() -> None:
            self._closed = True
            if self._accept_source is not None:
                self._accept_source.remove()
            for client in list(self.clients.values()):
                self._flush(client)
                self._drop(client)
            done.set()

        if self.loop.on_loop_thread:
            finish()
        else:
            self.loop.call_soon(finish, owner=self)
            if not done.wait(timeout):
                self._closed = True
        self._work.put(None)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass
