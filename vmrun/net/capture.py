"""``capture = "file.pcap"``: a tee in front of any backend, writing what crosses the link.

The file is classic pcap (LINKTYPE_ETHERNET, microsecond timestamps), written one record per
frame with one ``write`` each, so ``tcpdump -r`` reads it while the VM still runs. Frames of a
``vnet_hdr`` backend are written without their virtio-net header (a GSO frame appears as the
one large frame the guest or host handed over, as on a tap's own capture).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from vmrun.errors import VmrunError
from vmrun.net.backend import CAP_VNET_HDR, VNET_HDR_LEN, LinkCallbacks, NetBackend

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


class CaptureBackend(NetBackend):
    """Everything delegates to ``inner``; frames are copied to the pcap file on the way."""

    def __init__(self, inner: NetBackend, path: Path) -> None:
        super().__init__(kind=inner.kind, caps=inner.caps, mtu=inner.mtu,
                         link_up=inner.link_up)
        self.inner = inner
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise VmrunError(f"capture file {path}: {e.strerror}") from None
        os.write(self.fd, _GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self.skip = VNET_HDR_LEN if CAP_VNET_HDR in inner.caps else 0
        self.frames = 0

    # link_up follows the inner backend
    @property  # type: ignore[override]
    def link_up(self) -> bool:
        inner = self.__dict__.get("inner")
        return inner.link_up if inner is not None else self.__dict__.get("_link_up", True)

    @link_up.setter
    def link_up(self, value: bool) -> None:
        self.__dict__["_link_up"] = value

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def rx_dropped(self) -> int:  # type: ignore[override]
        return self.inner.rx_dropped if "inner" in self.__dict__ else 0

    @rx_dropped.setter
    def rx_dropped(self, value: int) -> None:
        pass

    @property
    def tx_dropped(self) -> int:  # type: ignore[override]
        return self.inner.tx_dropped if "inner" in self.__dict__ else 0

    @tx_dropped.setter
    def tx_dropped(self, value: int) -> None:
        pass

    def _record(self, pieces: Sequence[memoryview | bytes]) -> None:
        if self.fd < 0:
            return
        data = b"".join(bytes(p) for p in pieces)[self.skip:]
        now = time.time()
        cap = data[:SNAPLEN]
        os.write(self.fd, _RECORD.pack(int(now), int(now % 1 * 1e6), len(cap), len(data))
                 + cap)
        self.frames += 1

    def attach(self, callbacks: LinkCallbacks) -> None:
        self.inner.attach(callbacks)

    def detach(self) -> None:
        self.inner.detach()

    def set_rx(self, on: bool) -> None:
        self.inner.set_rx(on)

    def set_offloads(self, caps: frozenset[str]) -> None:
        self.inner.set_offloads(caps)

    def recv_into(self, buf: memoryview) -> int:
        n = self.inner.recv_into(buf)
        if n:
            self._record((buf[:n],))
        return n

    def send(self, frame: Sequence[memoryview | bytes]) -> bool:
        if not self.inner.send(frame):
            return False            # not sent: it comes again
        self._record(frame)
        return True

    def send_many(self, frames) -> int:
        n = self.inner.send_many(frames)
        for frame in frames[:n]:
            self._record(frame)
        return n

    def close(self) -> None:
        self.inner.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
