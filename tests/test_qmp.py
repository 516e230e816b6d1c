"""The QMP server against a fake machine (no KVM): the protocol as QEMU speaks it, the
plugin hook, and hostile clients (garbage, huge and deep input, clients that never read,
too many clients) that each get an error or are dropped while the server goes on."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrun.core.eventloop import EventLoop
from vmrun.plugins import build_registry, hookimpl
from vmrun.qmp import QmpCommand, QmpError, version_info
from vmrun.qmp.protocol import FatalInput, JsonSplitter, check_command
from vmrun.qmp.server import QmpServer


class FakeControl:
    """What the built-in commands drive, without a VM."""

    def __init__(self) -> None:
        self.cfg = SimpleNamespace(name="fake", uuid=uuid.UUID(int=7), cpus=1)
        self.machine = None
        self.state = "running"
        self.calls: list[str] = []
        self.emit = None

    def status(self) -> str:
        return self.state

    def pause(self) -> None:
        self.calls.append("pause")
        if self.state != "paused":
            self.state = "paused"
            self.emit("STOP")

    def resume(self) -> None:
        self.calls.append("resume")
        if self.state == "paused":
            self.state = "running"
            self.emit("RESUME")

    def powerdown(self) -> None:
        self.calls.append("powerdown")
        self.emit("POWERDOWN")

    def system_reset(self) -> None:
        self.calls.append("reset")

    def quit(self, code, reason, shutdown_reason="") -> None:
        self.calls.append(f"quit:{shutdown_reason}")


def _sleepy(ctx, seconds=0.0):
    time.sleep(seconds)
    return {"slept": seconds}


def _boom(ctx):
    raise RuntimeError("handler bug")


class ExtraPlugin:
    @hookimpl
    def vmrun_qmp_commands(self, register):
        register(QmpCommand("x-sleep", _sleepy, {"*seconds": "number"}, "sleep a while"))
        register(QmpCommand("x-boom", _boom))
        register(QmpCommand("x-echo", lambda ctx, text, n=1: {"text": text * n},
                            {"text": "str", "*n": "int"}))


@pytest.fixture
def server():
    reg = build_registry(entry_points=False, extra=[ExtraPlugin()])
    assert not reg.broken
    loop = EventLoop()
    loop.start()
    d = Path(tempfile.mkdtemp(prefix="vmrun-qmp-"))
    control = FakeControl()
    srv = QmpServer(d / "qmp.sock", loop, reg.qmp_commands, control, version_info(),
                    max_clients=4, max_output=64 * 1024, max_message=4096, max_depth=16)
    control.emit = srv.emit
    srv.start()
    yield srv
    srv.close()
    loop.close()
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


class Client:
    def __init__(self, path: Path, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buf = b""
        self.greeting = self.recv()
        if negotiate:
            assert self.cmd("qmp_capabilities") == {"return": {}}

    def send(self, data: bytes | dict) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode())

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        assert line.endswith(b"\r")
        return json.loads(line)

    def reply(self) -> dict:
        """The next message that is not an event."""
        while "event" in (msg := self.recv()):
            pass
        return msg

    def cmd(self, name: str, **kw) -> dict:
        msg = {"execute": name}
        if kw:
            msg["arguments"] = kw
        self.send(msg)
        return self.reply()

    def closed(self) -> bool:
        """True once the server has closed this connection (after any data it sent)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def alive(server: QmpServer) -> None:
    c = Client(server.path)
    assert c.cmd("query-name") == {"return": {"name": "fake"}}
    c.close()


def test_greeting_negotiation_and_ids(server: QmpServer) -> None:
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    c = Client(server.path, negotiate=False)
    assert c.greeting["QMP"]["version"] == version_info()
    assert c.greeting["QMP"]["capabilities"] == []
    c.send({"execute": "query-status", "id": 1})
    err = c.recv()
    assert err["error"]["class"] == "CommandNotFound" and err["id"] == 1
    c.send({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "x"})
    assert c.recv()["error"]["desc"] == "Capability 'oob' not available"
    c.send({"execute": "qmp_capabilities", "id": {"any": ["json"]}})
    assert c.recv() == {"return": {}, "id": {"any": ["json"]}}
    c.send({"execute": "qmp_capabilities"})
    assert c.recv()["error"]["class"] == "CommandNotFound"
    assert c.cmd("query-status") == {"return": {"status": "running", "running": True,
                                                "singlestep": False}}
    assert c.cmd("query-uuid") == {"return": {"UUID": str(uuid.UUID(int=7))}}
    assert c.cmd("query-version")["return"]["package"].startswith("vmrun ")
    names = {x["name"] for x in c.cmd("query-commands")["return"]}
    assert {"qmp_capabilities", "query-status", "stop", "cont", "system_powerdown",
            "system_reset", "quit", "query-pci", "query-block", "query-cpus-fast",
            "x-echo"} <= names
    c.close()


def test_errors_in_qemus_words(server: QmpServer) -> None:
    c = Client(server.path)
    cases = [
        ({"execute": "no-such", "id": 5},
         {"error": {"class": "CommandNotFound", "desc": "The command no-such has not been "
                    "found"}, "id": 5}),
        ({"id": 6}, {"error": {"class": "GenericError",
                               "desc": "QMP input lacks member 'execute'"}, "id": 6}),
        ({"execute": 3}, {"error": {"class": "GenericError",
                                    "desc": "QMP input member 'execute' must be a string"}}),
        ({"execute": "stop", "arguments": []},
         {"error": {"class": "GenericError",
                    "desc": "QMP input member 'arguments' must be an object"}}),
        ({"execute": "stop", "bogus": 1},
         {"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}),
        ({"execute": "stop", "arguments": {"x": 1}},
         {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}),
        ({"execute": "x-echo"},
         {"error": {"class": "GenericError", "desc": "Parameter 'text' is missing"}}),
        ({"execute": "x-echo", "arguments": {"text": "a", "n": True}},
         {"error": {"class": "GenericError",
                    "desc": "Invalid parameter type for 'n', expected: integer"}}),
    ]
    for msg, want in cases:
        c.send(msg)
        assert c.recv() == want, msg
    assert c.cmd("x-echo", text="ab", n=2) == {"return": {"text": "abab"}}
    got = c.cmd("x-boom")
    assert got["error"]["class"] == "GenericError" and "handler bug" in got["error"]["desc"]
    c.send(b"[1, 2]")
    assert c.recv()["error"]["desc"] == "QMP input must be a JSON object"
    c.send(b"this is not json\n")
    assert "JSON parse error" in c.recv()["error"]["desc"]
    c.send(b'{"execute": nope}')
    assert "JSON parse error" in c.recv()["error"]["desc"]
    # A command split over several writes and lines, strings holding brackets.
    c.send(b'{"execute":\n "x-echo", "arguments": {"text": "}{\\"]["')
    time.sleep(0.05)
    c.send(b'}}\n')
    assert c.recv() == {"return": {"text": '}{"]['}}
    c.close()
    alive(server)


def test_stop_cont_powerdown_events_in_order(server: QmpServer) -> None:
    c = Client(server.path)
    watcher = Client(server.path)
    c.send({"execute": "stop", "id": "s"})
    ev = c.recv()
    assert ev["event"] == "STOP"
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert abs(ev["timestamp"]["seconds"] - time.time()) < 60
    assert c.recv() == {"return": {}, "id": "s"}
    assert c.cmd("query-status")["return"]["status"] == "paused"
    assert watcher.recv()["event"] == "STOP"          # every negotiated client gets events
    c.send({"execute": "cont"})
    assert c.recv()["event"] == "RESUME"
    assert c.recv() == {"return": {}}
    c.cmd("system_powerdown")
    c.cmd("system_reset")
    assert c.cmd("quit") == {"return": {}}
    time.sleep(0.1)
    assert server.control.calls == ["pause", "resume", "powerdown", "reset",
                                    "quit:host-qmp-quit"]
    c.close()
    watcher.close()


def test_an_unnegotiated_client_gets_no_events(server: QmpServer) -> None:
    quiet = Client(server.path, negotiate=False)
    c = Client(server.path)
    c.cmd("stop")
    quiet.send({"execute": "qmp_capabilities"})
    assert quiet.recv() == {"return": {}}             # no STOP before it
    c.close()
    quiet.close()


def test_huge_message_and_deep_nesting_drop_the_client(server: QmpServer) -> None:
    c = Client(server.path)
    c.send(b'{"execute": "x-echo", "arguments": {"text": "' + b"a" * 10000)
    err = c.recv()
    assert "longer than 4096 bytes" in err["error"]["desc"]
    assert c.closed()
    c = Client(server.path)
    c.send(b"[" * 100)
    assert "nested deeper" in c.recv()["error"]["desc"]
    assert c.closed()
    c = Client(server.path)
    c.send(b"x" * 10000)                               # garbage without a newline
    assert "longer than" in c.recv()["error"]["desc"]
    assert c.closed()
    alive(server)


def test_a_client_that_never_reads_is_dropped(server: QmpServer) -> None:
    c = Client(server.path)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = "b" * 3000
    msg = json.dumps({"execute": "x-echo", "arguments": {"text": big}}).encode()
    before = server.dropped
    deadline = time.monotonic() + 20
    c.sock.settimeout(0.2)
    try:
        while server.dropped == before and time.monotonic() < deadline:
            try:
                c.sock.send(msg)
            except (TimeoutError, BlockingIOError):
                pass                                   # the server stopped reading us
            except (BrokenPipeError, ConnectionResetError):
                break
    finally:
        c.close()
    # The kernel's socket buffer filled, then the output bound: the client was dropped (its
    # commands never piled up: the pending bound stops reading it meanwhile).
    assert server.dropped > before
    alive(server)


def test_too_many_clients_get_an_error(server: QmpServer) -> None:
    clients = [Client(server.path) for _ in range(4)]
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(5)
    extra.connect(str(server.path))
    data = b""
    while not data.endswith(b"\n"):
        chunk = extra.recv(4096)
        if not chunk:
            break
        data += chunk
    assert json.loads(data)["error"]["desc"] == "too many QMP clients (at most 4)"
    assert extra.recv(10) == b""
    extra.close()
    for c in clients:
        c.close()
    time.sleep(0.1)
    alive(server)


def test_slow_command_does_not_block_other_clients_greeting(server: QmpServer) -> None:
    c = Client(server.path)
    c.send({"execute": "x-sleep", "arguments": {"seconds": 0.5}})
    t0 = time.monotonic()
    other = Client(server.path, negotiate=False)     # the loop still accepts and greets
    assert time.monotonic() - t0 < 0.4
    assert c.reply() == {"return": {"slept": 0.5}}
    c.close()
    other.close()


def test_a_plugin_cannot_take_a_core_command() -> None:
    class Thief:
        @hookimpl
        def vmrun_qmp_commands(self, register):
            register(QmpCommand("stop", lambda ctx: None))

    reg = build_registry(entry_points=False, extra=[Thief()])
    assert reg.qmp_commands["stop"].plugin == "vmrun.qmp.commands"
    assert any("'stop'" in why for why in reg.broken.values())
    with pytest.raises(ValueError, match="unknown type"):
        QmpCommand("x", lambda ctx: None, {"a": "string"})


def test_qmp_error_classes() -> None:
    with pytest.raises(QmpError) as e:
        check_command({"execute": "x", "exec-oob": "y"})
    assert e.value.error_class == "GenericError"


# -- the splitter on garbage (hypothesis) -----------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=5),
       st.integers(1, 17))
def test_splitter_finds_every_object_whatever_the_chunking(objs: list, chunk: int) -> None:
    data = b" \r\n".join(json.dumps(o).encode() for o in objs)
    sp = JsonSplitter(max_message=1 << 20)
    got = []
    for i in range(0, len(data), chunk):
        got += sp.feed(data[i:i + chunk])
    assert [p.value for p in got] == objs and all(p.error is None for p in got)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_splitter_on_garbage_errors_or_raises_fatal_never_anything_else(data: bytes,
                                                                        chunk: int) -> None:
    sp = JsonSplitter(max_message=256, max_depth=8)
    try:
        for i in range(0, len(data), chunk):
            for p in sp.feed(data[i:i + chunk]):
                if p.error is None:
                    json.dumps(p.value)                 # a real JSON value
                else:
                    assert p.value is None and p.error.startswith("JSON parse error")
        assert len(sp.buf) <= 256 + chunk
    except FatalInput:
        pass


@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.function_scoped_fixture],
          deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_from_a_client_never_takes_the_server_down(server: QmpServer,
                                                           data: bytes) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(server.path))
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.close()
    alive(server)


def test_context_finds_devices_by_id() -> None:
    from vmrun.qmp import QmpContext

    dev = object()
    control = SimpleNamespace(machine=SimpleNamespace(
        placed=[SimpleNamespace(id="disk0")], devices=[dev]))
    ctx = QmpContext(control, lambda name, data=None: None)
    assert ctx.device("disk0") is dev
    with pytest.raises(QmpError) as e:
        ctx.device("nope")
    assert e.value.error_class == "DeviceNotFound" and "'nope' not found" in e.value.desc
    control.machine = None
    with pytest.raises(QmpError):
        ctx.device("disk0")
