"""The QMP control socket: QEMU's machine protocol, so that management tools (and the
``qemu.qmp`` library, and ``socat``) can drive a running VM.

- :mod:`vmrun.qmp.protocol`: the wire format (JSON stream splitting, messages, errors);
- :mod:`vmrun.qmp.registry`: :class:`QmpCommand` and :class:`QmpContext`, what plugins use
  with the ``vmrun_qmp_commands`` hook;
- :mod:`vmrun.qmp.server`: the server on the devices' event loop;
- :mod:`vmrun.qmp.commands`: the built-in commands (registered through the hook too);
- :mod:`vmrun.qmp.client`: a small blocking client for the CLI (``vmrun stop``, ``ps``).
"""

from __future__ import annotations

import importlib.metadata

from vmrun.qmp.protocol import QmpError
from vmrun.qmp.registry import QmpCommand, QmpContext

__all__ = ["QmpCommand", "QmpContext", "QmpError", "version_info"]


def version_info() -> dict:
    """The greeting's and query-version's ``{"qemu": {...}, "package": ...}``: vmrun's own
    version in QEMU's fields (a client that compares QEMU versions sees 0.x)."""
    try:
        text = importlib.metadata.version("vmrun")
    except importlib.metadata.PackageNotFoundError:
        text = "0.0.0"
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"vmrun {text}"}
