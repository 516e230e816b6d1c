"""The contract between a NIC model and the host side of its link.

A NIC (virtio-net, e1000) knows only this class; the backends (``user`` through passt,
``tap``, ``socket``) and the capture tee implement it. A backend is created once per
``vmrun up`` (``ctx.host_resource("net", ...)``) and survives guest reboots; the NIC attaches
to it when realized and detaches at close.

Frames are whole Ethernet frames without FCS. Where a backend offers ``vnet_hdr``, every frame
in both directions is prefixed by a 12-byte ``virtio_net_hdr_v1`` (flags, gso_type, hdr_len,
gso_size, csum_start, csum_offset, num_buffers = 0) so checksum and segmentation offloads pass
through untouched; otherwise frames are complete (checksums filled, no GSO) and the NIC must
finish any offload itself before ``send``.

Threading: everything runs on the event loop thread (the backend registers its fd there);
``send`` may be called from the loop thread only; ``set_rx`` from any thread (a NIC reset runs
on a vCPU).

Additions since the first version (all with defaults here, so every backend and NIC written
against it still works): ``set_offloads`` (the offloads the guest accepted, tap's
TUNSETOFFLOAD), ``send_many`` (a batch in one system call where the host allows), the
counters ``rx_dropped``/``tx_dropped``, ``name`` and ``fault`` (a backend is the owner of its
own event-loop sources). No signature changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: The header a ``vnet_hdr`` backend carries before every frame (virtio 1.x, with num_buffers).
VNET_HDR_LEN = 12

#: Offloads a backend may pass through; a NIC offers the guest only what its backend has.
CAP_VNET_HDR = "vnet_hdr"   # frames carry a virtio_net_hdr_v1 both ways
CAP_CSUM = "csum"           # partial checksums (NEEDS_CSUM) may be sent and received
CAP_TSO4 = "tso4"
CAP_TSO6 = "tso6"
CAP_UFO = "ufo"


@dataclass
class LinkCallbacks:
    """What the attached NIC wants to hear, called on the event loop thread."""

    #: Frames can be read: call ``backend.recv_into`` until it returns 0. A NIC that stops
    #: earlier (to bound its work per call) must come back by itself (``loop.call_soon``):
    #: frames the backend has already buffered are not signalled again.
    readable: Callable[[], None]
    #: The link went up (True) or down (False): passt died, a socket peer left or came back.
    link: Callable[[bool], None] = lambda up: None
    #: ``send`` returned False earlier and there is room again.
    writable: Callable[[], None] = lambda: None


@dataclass
class NetBackend:
    """One host end of a link. Subclasses fill in the I/O; this base holds the shared state."""

    kind: str = "none"
    caps: frozenset[str] = field(default_factory=frozenset)
    mtu: int = 1500
    link_up: bool = True
    #: Frames the backend dropped: too long for the NIC's buffer, link down, host errors.
    rx_dropped: int = 0
    tx_dropped: int = 0

    @property
    def name(self) -> str:
        return f"net-{self.kind}"

    def fault(self, reason: str) -> None:
        """An event-loop callback of this backend raised (a bug): the link goes down."""
        import logging

        logging.getLogger("vmrun.net").error("%s: %s: link down", self.name, reason)
        self.link_up = False

    def set_offloads(self, caps: frozenset[str]) -> None:
        """The offloads (CAP_CSUM, CAP_TSO4, ...) the guest's driver takes in received
        frames; a ``vnet_hdr`` backend hands it no others. Default: nothing to do."""

    def attach(self, callbacks: LinkCallbacks) -> None:
        """Start delivering to ``callbacks``; receive polling starts switched off."""
        raise NotImplementedError

    def detach(self) -> None:
        """Stop delivering (the NIC is closing or resetting); the link itself stays."""
        raise NotImplementedError

    def set_rx(self, on: bool) -> None:
        """Poll the host side only while the guest has posted receive buffers."""
        raise NotImplementedError

    def recv_into(self, buf: memoryview) -> int:
        """Copy one frame (with its vnet header where ``vnet_hdr``) into ``buf``; 0 = none now.

        A frame longer than ``buf`` is dropped (counted), never split or truncated silently.
        """
        raise NotImplementedError

    def send(self, frame: Sequence[memoryview | bytes]) -> bool:
        """Send one frame given as pieces (gathered without a copy where the host allows).

        True: sent (or dropped for a reason the backend counts, e.g. link down). False: the host
        side is full right now; the NIC keeps the frame and waits for ``writable``.
        """
        raise NotImplementedError

    def send_many(self, frames: Sequence[Sequence[memoryview | bytes]]) -> int:
        """Send frames in order; how many were taken (as by ``send``). Fewer than all: the
        host side is full, the rest wait for ``writable``. A backend that can hand several
        frames to the host in one system call (a stream socket) overrides this."""
        for i, frame in enumerate(frames):
            if not self.send(frame):
                return i
        return len(frames)

    def close(self) -> None:
        """Release host resources (at the end of ``vmrun up``, not at a guest reboot)."""
        raise NotImplementedError
