"""``backend = "user"``: rootless networking through passt, which vmrun starts and supervises.

passt gets one end of a unix socket pair (``--fd``, so there is no socket path to race for)
and speaks QEMU's stream framing on it (:class:`~vmrun.net.stream.StreamLink`). It gives the
guest DHCP and the host's routes and maps connections to the gateway address to the host's
loopback; ``forward`` entries become its ``-t``/``-u`` port maps. The guest is handed no DNS
resolver (``--no-dhcp-dns``): vmrun never sends a guest's name lookups anywhere by default.

Supervision: a pidfd of the passt process sits on the event loop; when passt dies the link
goes down (the NIC tells the guest) and one line says so, with passt's last words. passt
runs with ``-1`` (it quits when vmrun's end of the socket closes) and is killed at close.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from vmrun.core.eventloop import EventLoop, Source
from vmrun.errors import VmrunError
from vmrun.net.stream import StreamLink

log = logging.getLogger("vmrun.net")

PASST = "passt"


@dataclass(frozen=True)
class Forward:
    """``proto:[addr:]host_port:guest_port``: a host port passt listens on for the guest."""

    proto: str
    addr: str | None
    host_port: int
    guest_port: int

    def passt_spec(self) -> str:
        ports = f"{self.host_port}:{self.guest_port}"
        return f"{self.addr}/{ports}" if self.addr else ports


def parse_forward(text: str) -> Forward:
    """``"tcp:127.0.0.1:2222:22"``, ``"udp:5353:53"`` (ValueError says what is wrong)."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("tcp", "udp"):
        raise ValueError(f"{text!r}: a forward is \"tcp|udp:[ADDRESS:]HOST_PORT:GUEST_PORT\"")
    addr = None
    if len(parts) == 4:
        try:
            addr = str(ipaddress.IPv4Address(parts[1]))
        except ValueError:
            raise ValueError(f"{text!r}: {parts[1]!r} is not an IPv4 address") from None
    ports = []
    for i, p in enumerate(parts[-2:]):
        if i == 0 and p == "auto":          # a free host port, chosen when the VM starts
            ports.append(0)
            continue
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise ValueError(f"{text!r}: port {p!r} is not a number in 1-65535")
        ports.append(int(p))
    return Forward(parts[0], addr, ports[0], ports[1])


def check_forwards(forwards: list[Forward]) -> None:
    """Each host port must be free now (a taken one is one line before the VM starts)."""
    seen: set[tuple[str, int]] = set()
    for f in forwards:
        if f.host_port == 0:
            continue                        # "auto": any free port will do
        if (f.proto, f.host_port) in seen:
            raise ValueError(f"{f.proto} host port {f.host_port} is forwarded twice")
        seen.add((f.proto, f.host_port))
        kind = socket.SOCK_STREAM if f.proto == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET, kind)
        try:
            if f.proto == "tcp":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((f.addr or "0.0.0.0", f.host_port))
        except OSError as e:
            where = f"{f.addr or '*'}:{f.host_port}"
            raise ValueError(f"{f.proto} host port {where} cannot be used: {e.strerror}") \
                from None
        finally:
            s.close()


def _port_taken(f: Forward) -> bool:
    """Whether someone is bound to ``f``'s host port: a bind without SO_REUSEADDR fails on a
    listening TCP socket and on any bound UDP one."""
    kind = socket.SOCK_STREAM if f.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((f.addr or "0.0.0.0", f.host_port))
        except OSError:
            return True
    return False


def resolve_auto(forwards: list[Forward]) -> list[Forward]:
    """Give each ``auto`` forward a free host port (asked of the kernel: bind to port 0)."""
    out = []
    for f in forwards:
        if f.host_port == 0:
            kind = socket.SOCK_STREAM if f.proto == "tcp" else socket.SOCK_DGRAM
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind((f.addr or "127.0.0.1", 0))
                f = Forward(f.proto, f.addr, s.getsockname()[1], f.guest_port)
        out.append(f)
    return out


def find_passt() -> str:
    path = shutil.which(PASST)
    if path is None:
        raise ValueError("passt is not installed (the Debian package passt; `make deps` "
                         "installs it): the user backend needs it")
    return path


class UserBackend(StreamLink):
    """passt on the other end of a socket pair."""

    strip_padding = True        # passt reads a short frame's padding as TCP payload

    #: How long passt may take to bind the forwarded host ports.
    LISTEN_TIMEOUT = 10.0

    def __init__(self, loop: EventLoop, forwards: list[Forward], mtu: int = 1500,
                 passt: str | None = None) -> None:
        super().__init__(loop, "user", mtu)
        try:
            binary = passt or find_passt()
            check_forwards(forwards)
            forwards = resolve_auto(forwards)
        except ValueError as e:
            raise VmrunError(f"user network: {e}") from None
        #: The forwards as passt got them (``auto`` ports resolved).
        self.forwards = forwards
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = theirs.fileno()
        tcp = ",".join(f.passt_spec() for f in forwards if f.proto == "tcp") or "none"
        udp = ",".join(f.passt_spec() for f in forwards if f.proto == "udp") or "none"
        self.argv = [binary, "-f", "-q", "-1", "--fd", str(fd), "-m", str(mtu),
                     "--no-dhcp-dns", "--no-dhcp-search", "-t", tcp, "-u", udp]
        try:
            self.proc = subprocess.Popen(self.argv, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True)
        except OSError as e:
            ours.close()
            theirs.close()
            raise VmrunError(f"user network: cannot start {binary}: {e.strerror}") from None
        theirs.close()
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        try:
            self._await_listening(forwards)
        except VmrunError:
            ours.close()
            self.proc.kill()
            self.proc.wait()
            self.proc.stderr.close()
            raise
        self.exited = False
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.pid_src: Source | None = loop.add(self.pidfd, self._died, owner=self)
        self._connected(ours)

    def _await_listening(self, forwards: list[Forward]) -> None:
        """Return once passt listens on every forwarded host port (it binds them after it
        starts): a user who connects as soon as the VM is up must not be refused, as with
        QEMU's hostfwd, which binds before the guest runs."""
        waiting = list(forwards)
        timeout = self.LISTEN_TIMEOUT
        end = time.monotonic() + timeout
        while waiting:
            waiting = [f for f in waiting if not _port_taken(f)]
            if not waiting:
                return
            if self.proc.poll() is not None:
                words = self._last_words()
                raise VmrunError(f"user network: passt exited with {self.proc.returncode} "
                                 f"before it listened{f' ({words})' if words else ''}")
            if time.monotonic() > end:
                f = waiting[0]
                raise VmrunError(f"user network: passt did not listen on {f.proto} host port "
                                 f"{f.addr or '*'}:{f.host_port} within {timeout:g}s")
            time.sleep(0.01)

    def _last_words(self) -> str:
        try:
            text = self.proc.stderr.read() or b""  # type: ignore[union-attr]
        except (OSError, ValueError):
            text = b""
        lines = [ln for ln in text.decode(errors="replace").splitlines()
                 if ln.strip() and "syslog" not in ln and "root" not in ln]
        return lines[-1].strip() if lines else ""

    def _died(self, fd: int) -> None:
        if self.pid_src is not None:
            self.pid_src.remove()
            self.pid_src = None
        code = self.proc.wait()
        self.exited = True
        words = self._last_words()
        log.error("%s: passt (pid %d) exited with %s%s: link down", self.name, self.proc.pid,
                  code, f" ({words})" if words else "")
        self._lost()

    def _disconnected(self) -> None:
        """passt closed the socket; its exit (next on the loop) says why."""

    def close(self) -> None:
        if self.pid_src is not None:
            self.pid_src.remove()
            self.pid_src = None
        super().close()             # passt sees the socket close and quits (-1)
        if not self.exited:
            try:
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.exited = True
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        os.close(self.pidfd)
