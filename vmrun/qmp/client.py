"""A small blocking QMP client for vmrun's own commands (``vmrun stop``, ``ps``, the console's
C-a x). Tests drive the server with ``qemu.qmp`` instead, a client nobody here wrote."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from vmrun.errors import VmrunError


class QmpClient:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events: list[dict] = []
        try:
            self.sock.connect(str(path))
            self.greeting = self._recv()
            if "QMP" not in self.greeting:
                raise VmrunError(f"{path}: not a QMP greeting")
            self.execute("qmp_capabilities")
        except OSError as e:
            self.sock.close()
            raise VmrunError(f"{path}: cannot talk to the control socket: "
                             f"{e.strerror or e}") from None
        except BaseException:
            self.sock.close()
            raise

    def _recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the VM closed its control socket")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise VmrunError(f"{self.path}: the control socket sent no JSON") from None

    def execute(self, name: str, **arguments: Any) -> Any:
        """The command's ``return``; its error as a one-line VmrunError."""
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            got = self._recv()
            if "event" in got:
                self.events.append(got)
                continue
            if "error" in got:
                err = got["error"]
                raise VmrunError(f"{name}: {err.get('desc', err)}")
            return got.get("return")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
