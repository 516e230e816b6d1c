"""What one ``vmrun up`` owns on the host, across every boot of its guest.

A guest reboot builds a fresh VM (fresh RAM, fresh device state), but the host side of a
device must not flicker with it: a tap device or a passt process keeps its address, a VNC
listener keeps its clients, an input source keeps typing into whichever keyboard the current
boot has. :class:`HostContext` holds those: the devices' event loop, the input hub, and
named host resources a device creates on first use (``ctx.host.get(key, create)``) and finds
again on the next boot. The runner closes them when the VM ends for good.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from vmrun.core.eventloop import EventLoop
from vmrun.core.input import InputHub

T = TypeVar("T")
log = logging.getLogger("vmrun.host")


class HostContext:
    def __init__(self, loop: EventLoop | None = None, input_hub: InputHub | None = None) -> None:
        self.loop = loop or EventLoop()
        self.input = input_hub or InputHub()
        self._resources: dict[str, Any] = {}
        #: Facts devices publish for the VM's state (``vmrun ps``, ``vmrun ssh``): e.g. the
        #: host port vmrun chose for ``forward = ["tcp:127.0.0.1:auto:22"]`` as
        #: ``{"net:tcp:22": 40123}``.
        self.published: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        self.loop.start()

    def get(self, key: str, create: Callable[[], T]) -> T:
        """The resource named ``key``, created by ``create()`` the first time it is asked for
        (the first boot) and handed back unchanged on later boots."""
        with self._lock:
            if key not in self._resources:
                self._resources[key] = create()
            return self._resources[key]

    def close(self) -> None:
        """Close every resource (newest first), then stop the loop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            items = list(self._resources.items())[::-1]
            self._resources.clear()
        for key, res in items:
            close = getattr(res, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as e:
                    log.warning("closing host resource %s: %s", key, e)
        self.loop.close()
