"""virtio-net (virtio spec 5.1), modern only, over any :class:`vmrun.api.NetBackend`.

Queues: 0 receive, 1 transmit, 2 control. Offered: MAC, STATUS (the backend's link), MTU,
MRG_RXBUF, CTRL_VQ with CTRL_RX (promiscuous/all-multi/all-uni/no-multi/no-uni/no-broadcast
and the MAC filter table) and CTRL_MAC_ADDR; with a ``vnet_hdr`` backend (tap) also CSUM,
GUEST_CSUM and HOST_/GUEST_TSO4/6 as far as the backend has them (the header then passes
through, checked); other backends get none of them, so frames are complete both ways.
EVENT_IDX comes from the transport's virtqueue (avail_event on pop, used_event on completion).

Receive: the backend is polled only while the driver has posted receive buffers: the device
switches it on when the receive queue is kicked and off when the queue runs dry (the frame in
hand waits for the next kick). A frame goes into one chain, or into as many as it needs with
MRG_RXBUF (``num_buffers``); at most ``RX_BATCH`` frames per wake-up, then the device comes
back through ``call_soon`` (the backend does not signal frames it already buffered).

Transmit: each chain is a 12-byte header and a frame, handed to the backend as zero-copy
views of guest memory. The header is guest input: unknown flags, GSO types the device did not
offer, a GSO frame without NEEDS_CSUM or with a zero gso_size, checksum offsets outside the
frame, hdr_len past the frame, frames shorter than an Ethernet header or longer than 64 KiB —
each drops that frame (counted in ``tx_bad``), never the device. A full host side keeps the
frame in hand until the backend says ``writable``. Chain-structure errors (outside RAM, loops)
are GuestErrors: the transport marks the device DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
import struct
from collections import deque

from vmrun.api import (
    CAP_CSUM,
    CAP_TSO4,
    CAP_TSO6,
    CAP_VNET_HDR,
    DescriptorChain,
    GuestError,
    LinkCallbacks,
    NetBackend,
    VirtioDevice,
    check_version,
    versioned,
)

log = logging.getLogger("vmrun.virtio-net")

VIRTIO_ID_NET = 1
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_HOST_UFO = 1 << 14
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_CTRL_RX = 1 << 18
F_CTRL_MAC_ADDR = 1 << 23

S_LINK_UP = 1
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

CTRL_RX = 0
CTRL_RX_PROMISC, CTRL_RX_ALLMULTI, CTRL_RX_ALLUNI = 0, 1, 2
CTRL_RX_NOMULTI, CTRL_RX_NOUNI, CTRL_RX_NOBCAST = 3, 4, 5
CTRL_MAC = 1
CTRL_MAC_TABLE_SET = 0
CTRL_MAC_ADDR_SET = 1
CTRL_OK = 0
CTRL_ERR = 1
MAC_TABLE_ENTRIES = 64        # per table (unicast, multicast); more: all-uni/all-multi

HDR_LEN = 12
ETH_HLEN = 14
MAX_FRAME = 65535 + ETH_HLEN  # without the header: the largest (GSO) frame taken
RX_BATCH = 128
TX_BATCH = 256
TX_CHUNK = 64
RX_CHUNK = 32
RX_Q, TX_Q, CTRL_Q = 0, 1, 2
_HDR = struct.Struct("<BBHHHHH")
BROADCAST = b"\xff" * 6
ZERO_HDR = bytes(HDR_LEN)


class VirtioNet(VirtioDevice):
    device_type = VIRTIO_ID_NET
    pci_class = 0x020000
    name = "virtio-net"

    def __init__(self, backend: NetBackend, mac: bytes, queue_size: int = 256) -> None:
        self.backend = backend
        self.mac = bytes(mac)
        self.perm_mac = self.mac
        self.queue_sizes = [queue_size, queue_size, 64]
        self.vnet = CAP_VNET_HDR in backend.caps
        f = F_MAC | F_STATUS | F_MTU | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR
        if self.vnet and CAP_CSUM in backend.caps:
            f |= F_CSUM | F_GUEST_CSUM
            if CAP_TSO4 in backend.caps:
                f |= F_HOST_TSO4 | F_GUEST_TSO4
            if CAP_TSO6 in backend.caps:
                f |= F_HOST_TSO6 | F_GUEST_TSO6
        self.features = f
        self.mtu = backend.mtu
        self.acked = 0
        self.live = False
        self.link_up = backend.link_up
        # what crossed (for tests and stats)
        self.rx_frames = self.tx_frames = 0
        self.rx_filtered = self.rx_no_room = self.tx_bad = 0
        self._rxbuf = bytearray(HDR_LEN + MAX_FRAME + 64)
        self._rxview = memoryview(self._rxbuf)
        self._reset_state()

    def _reset_state(self) -> None:
        self.live = False
        self.promisc = True           # as after a reset, until the driver sets its filter
        self.allmulti = self.alluni = False
        self.nomulti = self.nouni = self.nobcast = False
        self.uni_table: set[bytes] = set()
        self.multi_table: set[bytes] = set()
        self.mac = self.perm_mac
        self._rx_pending = 0          # length (with header) of the frame in hand, 0: none
        self._rx_chains: deque[DescriptorChain] = deque()   # popped, not yet filled
        self._tx_pending: tuple[list[DescriptorChain], list] | None = None
        self._rx_again = self._tx_again = False
        self._rx_done: list[tuple[DescriptorChain, int]] = []
        self._direct_min = 0
        self._rx_dry = True
        self._restored: tuple[list[int], list[int]] | None = None   # held heads, to re-walk

    # -- wiring --------------------------------------------------------------------------
    def setup(self) -> None:
        self.backend.attach(LinkCallbacks(self._readable, self._link, self._writable))

    def config_bytes(self) -> bytes:
        status = S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, self.mtu)

    def activate(self, mem, queues, acked_features: int) -> None:
        super().activate(mem, queues, acked_features)
        self.acked = acked_features
        self.mrg = bool(acked_features & F_MRG_RXBUF)
        offl = set()
        if acked_features & F_GUEST_CSUM:
            offl.add(CAP_CSUM)
            if acked_features & F_GUEST_TSO4:
                offl.add(CAP_TSO4)
            if acked_features & F_GUEST_TSO6:
                offl.add(CAP_TSO6)
        self.guest_offloads = frozenset(offl)
        # Buffers at least this large take frames directly (0: never). Without mergeable
        # buffers a frame must fit one buffer anyway; with them, only while every frame the
        # link carries fits one (no GSO frames coming to the guest).
        mtu_frame = HDR_LEN + self.mtu + ETH_HLEN + 4
        if not self.mrg:
            self._direct_min = HDR_LEN + ETH_HLEN
        elif CAP_TSO4 in offl or CAP_TSO6 in offl:
            self._direct_min = 0
        else:
            self._direct_min = mtu_frame
        if self.vnet:
            self.backend.set_offloads(self.guest_offloads)
        self.live = True
        if self._restored is not None:
            self._take_back(*self._restored)
        else:
            self.link_up = self.backend.link_up
        if queues[RX_Q].ready and queues[RX_Q].has_available():
            self.backend.set_rx(True)

    def queue_notify(self, index: int) -> None:
        if index == RX_Q:
            # New buffers: fill them from what the backend holds now, then have it polled
            # unless they are used up already (saves a wake-up per kick).
            self._rx_run()
            if self.live and not self._rx_dry:
                self.backend.set_rx(True)
        elif index == TX_Q:
            self._tx_run()
        elif index == CTRL_Q:
            self._ctrl_run()

    def reset(self) -> None:
        with self.transport.lock:
            self.backend.set_rx(False)
            if self.vnet:
                self.backend.set_offloads(frozenset())
            self._reset_state()

    def close(self) -> None:
        self.backend.set_rx(False)
        self.backend.detach()       # the backend itself is the run's: it outlives this boot

    # -- snapshots -------------------------------------------------------------------------
    state_version = 1
    _FILTER = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")

    def save_state(self) -> dict:
        """What the driver set through the control queue (receive mode, MAC filter tables,
        the MAC), the link status it was told, the chains the device holds popped (receive
        buffers waiting for a frame, transmit frames the backend has not taken yet: by
        head, walked again from the descriptor table at restore) and the received frame it
        holds half delivered. Frames still in the backend are host-side: not saved (lost at
        a restore, as on a wire); the backend itself is the restored run's."""
        with self.transport.lock:
            tx = self._tx_pending[0] if self._tx_pending else []
            return versioned(self.state_version, {
                **{k: getattr(self, k) for k in self._FILTER},
                "mac": self.mac, "link_up": self.link_up,
                "uni_table": sorted(self.uni_table), "multi_table": sorted(self.multi_table),
                "rx_chains": [c.head for c in self._rx_chains],
                "tx_chains": [c.head for c in tx],
                "rx_frame": bytes(self._rxview[:self._rx_pending])})

    def load_state(self, state: dict) -> None:
        """Before activation: the chains held are taken back when the queues are live."""
        f = check_version(self.name, state, self.state_version)
        for k in self._FILTER:
            setattr(self, k, bool(f[k]))
        self.mac, self.link_up = bytes(f["mac"]), bool(f["link_up"])
        self.uni_table, self.multi_table = set(f["uni_table"]), set(f["multi_table"])
        frame = f["rx_frame"]
        if len(frame) > len(self._rxbuf):
            raise ValueError(f"{self.name}: a held frame of {len(frame)} bytes")
        self._rxbuf[:len(frame)] = frame
        self._rx_pending = len(frame)
        self._restored = (list(f["rx_chains"]), list(f["tx_chains"]))

    def _take_back(self, rx: list[int], tx: list[int]) -> None:
        """Activation after a restore: the held chains again, and the link as the backend
        has it now (a change from the saved one is signalled, as any link change)."""
        self._restored = None
        self._rx_chains = deque(self.queues[RX_Q].chain_at(h) for h in rx)
        chains = [self.queues[TX_Q].chain_at(h) for h in tx]
        frames = [self._tx_frame(c) for c in chains]
        if None in frames:            # the guest rewrote a frame it had handed over
            raise ValueError(f"{self.name}: a held transmit frame changed in the snapshot")
        if chains:
            self._tx_pending = (chains, frames)
        if self.loop is not None:
            self.loop.call_soon(lambda: self._link(self.backend.link_up), owner=self)

    # -- backend callbacks (event loop) ----------------------------------------------------
    def _guarded(self, fn) -> None:
        """Run device work started by the backend under the transport's lock; whatever it
        raises breaks this device (not the backend, which owns the loop source)."""
        t = self.transport
        with t.lock:
            try:
                fn()
            except Exception as e:
                t.fault(f"{type(e).__name__}: {e}")

    def _readable(self) -> None:
        self._guarded(self._rx_run)

    def _rx_soon(self) -> None:
        self._rx_again = False
        self._guarded(self._rx_run)

    def _writable(self) -> None:
        self._guarded(self._tx_run)

    def _tx_soon(self) -> None:
        self._tx_again = False
        self._guarded(self._tx_run)

    def _link(self, up: bool) -> None:
        if up == self.link_up:
            return
        self.link_up = up
        log.info("%s: link %s", self.name, "up" if up else "down")
        if self.acked & F_STATUS:
            self.transport.device_config_changed()

    # -- receive ---------------------------------------------------------------------------
    def _rx_run(self) -> None:
        t = self.transport
        if not self.live or not t.serving(RX_Q):
            self._rx_dry = True
            self.backend.set_rx(False)
            return
        self._rx_dry = False
        backend = self.backend
        view = self._rxview
        target = view if self.vnet else view[HDR_LEN:]
        q = self.queues[RX_Q]
        chains = self._rx_chains
        direct_min = self._direct_min
        dma = self.dma
        self._rx_done = done = []
        for _ in range(RX_BATCH):
            n = self._rx_pending
            if not n:
                # The usual case: a chain of one buffer that any frame the link may carry
                # fits in: the backend reads straight into guest memory (no staging copy).
                chain = chains.popleft() if chains else q.pop()
                if chain is None:        # out of buffers: wait for the driver's kick
                    self._rx_dry = True
                    backend.set_rx(False)
                    break
                w = chain.writable
                if not w:
                    raise GuestError(f"receive chain at head {chain.head} has no writable "
                                     "buffer")
                if direct_min and len(w) == 1 and w[0][1] >= direct_min:
                    gv = dma.view(w[0][0], w[0][1])
                    got = backend.recv_into(gv if self.vnet else gv[HDR_LEN:])
                    if not got:
                        chains.appendleft(chain)
                        break
                    n = got if self.vnet else got + HDR_LEN
                    if n < HDR_LEN + ETH_HLEN or not self._accept(gv, n):
                        chains.appendleft(chain)     # not for the guest: the buffer is reused
                        continue
                    gv[10] = 1                       # num_buffers
                    gv[11] = 0
                    done.append((chain, n))
                    self.rx_frames += 1
                    if len(done) >= RX_CHUNK:        # let the driver see them as we go on
                        t.complete_many(RX_Q, done)
                        done.clear()
                    continue
                chains.appendleft(chain)
                got = backend.recv_into(target)
                if not got:
                    break
                n = got if self.vnet else got + HDR_LEN
                if n < HDR_LEN + ETH_HLEN or not self._accept(view, n):
                    continue
                self._rx_pending = n
            used = self._deliver(q, n)
            if used < 0:                 # out of buffers: wait for the driver's kick
                self._rx_dry = True
                backend.set_rx(False)
                break
            self._rx_pending = 0
            if used:
                self.rx_frames += 1
                if len(done) >= RX_CHUNK:
                    t.complete_many(RX_Q, done)
                    done.clear()
        else:
            if not self._rx_again:       # more may be buffered: come back, bounded
                self._rx_again = True
                self.loop.call_soon(self._rx_soon, owner=self)
        if done:
            t.complete_many(RX_Q, done)

    def _accept(self, view: memoryview, n: int) -> bool:
        """The receive filter, and the header a vnet_hdr backend sent."""
        if self.vnet:
            flags, gso = view[0], view[1]
            if gso & ~GSO_ECN != GSO_NONE:
                kind = gso & ~GSO_ECN
                cap = CAP_TSO4 if kind == GSO_TCPV4 else CAP_TSO6 if kind == GSO_TCPV6 else ""
                if cap not in self.guest_offloads or gso & GSO_ECN:
                    self.rx_filtered += 1
                    return False
            if flags & HDR_F_NEEDS_CSUM and CAP_CSUM not in self.guest_offloads:
                self.rx_filtered += 1
                return False
            if flags & HDR_F_DATA_VALID and CAP_CSUM not in self.guest_offloads:
                view[0] = flags & ~HDR_F_DATA_VALID
        else:
            view[0:HDR_LEN] = ZERO_HDR
        if self.promisc:
            return True
        dst = bytes(view[HDR_LEN:HDR_LEN + 6])
        if dst == BROADCAST:
            ok = not self.nobcast
        elif dst[0] & 1:
            ok = not self.nomulti and (self.allmulti or dst in self.multi_table)
        else:
            ok = not self.nouni and (dst == self.mac or self.alluni or dst in self.uni_table)
        if not ok:
            self.rx_filtered += 1
        return ok

    def _deliver(self, q, n: int) -> int:
        """Copy the frame in hand (``n`` bytes with its header) into receive chains; the
        chains used, or -1 when the queue has not enough buffers yet (nothing is lost)."""
        chains = self._rx_chains
        dma = self.dma
        if not self.mrg:
            chain = chains.popleft() if chains else q.pop()
            if chain is None:
                return -1
            if chain.writable_len == 0:
                raise GuestError(f"receive chain at head {chain.head} has no writable buffer")
            if chain.writable_len < n:
                # Buffers too small for the frame: it is dropped, the chain kept for the next.
                self.rx_no_room += 1
                chains.appendleft(chain)
                return 0
            struct.pack_into("<H", self._rxbuf, 10, 1)
            w = chain.writable
            if len(w) == 1:
                gpa, _ = w[0]
                dma.view(gpa, n)[:] = self._rxview[:n]
            else:
                self._copy(dma.sg(w).views, 0, n)
            self._rx_done.append((chain, n))
            return 1
        room = sum(c.writable_len for c in chains)
        while room < n:
            chain = q.pop()
            if chain is None:
                return -1
            if chain.writable_len == 0:
                raise GuestError(f"receive chain at head {chain.head} has no writable buffer")
            chains.append(chain)
            room += chain.writable_len
        count = 0
        need = 0
        for c in chains:
            count += 1
            need += c.writable_len
            if need >= n:
                break
        struct.pack_into("<H", self._rxbuf, 10, count)
        pos = 0
        done = self._rx_done
        for _ in range(count):
            chain = chains.popleft()
            k = min(chain.writable_len, n - pos)
            self._copy(dma.sg(chain.writable).views, pos, k)
            done.append((chain, k))
            pos += k
        return count

    def _copy(self, views: list[memoryview], pos: int, n: int) -> None:
        src = self._rxview
        end = pos + n
        for v in views:
            if pos >= end:
                break
            k = min(len(v), end - pos)
            v[:k] = src[pos:pos + k]
            pos += k

    # -- transmit --------------------------------------------------------------------------
    def _tx_run(self) -> None:
        """Take frames in chunks of TX_CHUNK, hand each chunk to the backend in one
        ``send_many`` and give its chains back at once (so the driver refills while the next
        chunk goes out), up to TX_BATCH per call. Frames the backend did not take stay in
        hand (in order) until it calls ``writable``."""
        t = self.transport
        if not self.live or not t.serving(TX_Q):
            return
        q = self.queues[TX_Q]
        pop = q.pop
        tx_frame = self._tx_frame
        taken = 0
        while taken < TX_BATCH:
            chains: list[DescriptorChain] = []
            frames: list = []
            if self._tx_pending:
                chains, frames = self._tx_pending
                self._tx_pending = None
            done: list[tuple[DescriptorChain, int]] = []
            while len(chains) < TX_CHUNK:
                chain = pop()
                if chain is None:
                    break
                pieces = tx_frame(chain)
                if pieces is None:
                    done.append((chain, 0))      # a bad frame: dropped, its chain goes back
                    continue
                chains.append(chain)
                frames.append(pieces)
            full = len(chains) >= TX_CHUNK
            taken += len(chains) + len(done)
            if frames:
                n = self.backend.send_many(frames)
                self.tx_frames += n
                done.extend((c, 0) for c in chains[:n])
                if n < len(frames):
                    self._tx_pending = (chains[n:], frames[n:])   # the backend calls writable
                    full = False
            if done:
                t.complete_many(TX_Q, done)
            if not full:
                return
        if not self._tx_again:               # more waiting: come back, bounded per call
            self._tx_again = True
            self.loop.call_soon(self._tx_soon, owner=self)

    def _tx_frame(self, chain: DescriptorChain) -> list | tuple | None:
        """The pieces to send for one transmit chain, or None: a bad frame, dropped."""
        total = chain.readable_len
        if total < HDR_LEN + ETH_HLEN or total > HDR_LEN + MAX_FRAME:
            self.tx_bad += 1
            return None
        readable = chain.readable
        if len(readable) == 1:
            # The usual chain (Linux with VERSION_1, any_header_sg): header and frame in one
            # buffer; the virtqueue walk already checked it lies in RAM.
            gpa, n = readable[0]
            first = self.dma.view(gpa, n)
            if not self.vnet:
                if first[0] or first[1] or n - HDR_LEN > self.mtu + ETH_HLEN + 4:
                    self.tx_bad += 1        # offloads we never offered, or a giant frame
                    return None
                return (first[HDR_LEN:],)
            hdr = bytes(first[:HDR_LEN])
            frame = [first[HDR_LEN:]]
        else:
            views = self.dma.sg(readable).views
            first = views[0]
            if len(first) >= HDR_LEN:
                hdr = bytes(first[:HDR_LEN])
                frame = [first[HDR_LEN:], *views[1:]] if len(first) > HDR_LEN else views[1:]
            else:
                r = self.dma.sg(readable).reader()
                hdr = r.read(HDR_LEN)
                frame = r.take().views
        flags, gso, hdr_len, gso_size, csum_start, csum_offset, _ = _HDR.unpack(hdr)
        n = total - HDR_LEN
        if not self.vnet:
            if flags or gso or n > self.mtu + ETH_HLEN + 4:
                self.tx_bad += 1            # offloads we never offered, or a giant frame
                return None
            return frame
        acked = self.acked
        if flags & ~HDR_F_NEEDS_CSUM:
            self.tx_bad += 1
            return None
        if flags & HDR_F_NEEDS_CSUM:
            if not acked & F_CSUM or csum_start + csum_offset + 2 > n:
                self.tx_bad += 1
                return None
        kind = gso & ~GSO_ECN
        if kind != GSO_NONE:
            ok = (kind == GSO_TCPV4 and acked & F_HOST_TSO4) or \
                (kind == GSO_TCPV6 and acked & F_HOST_TSO6)
            if not ok or gso & GSO_ECN or not flags & HDR_F_NEEDS_CSUM or gso_size == 0 \
                    or hdr_len > n or hdr_len < ETH_HLEN + 20:
                self.tx_bad += 1
                return None
        elif gso or n > self.mtu + ETH_HLEN + 4:
            self.tx_bad += 1
            return None
        clean = _HDR.pack(flags, gso, hdr_len, gso_size, csum_start, csum_offset, 0)
        return [clean, *frame]

    # -- control queue ---------------------------------------------------------------------
    def _ctrl_run(self) -> None:
        q = self.queues[CTRL_Q]
        t = self.transport
        done = 0
        while True:
            chain = q.pop()
            if chain is None:
                break
            if not chain.writable or chain.readable_len < 2:
                raise GuestError(f"control request at head {chain.head}: no class/command or "
                                 "no ack byte")
            addr, length = chain.writable[-1]
            ack = self.dma.view(addr + length - 1, 1)
            if chain.readable_len > 2 + 8 + 12 * MAC_TABLE_ENTRIES * 2:
                ack[0] = CTRL_ERR
            else:
                data = self.dma.sg(chain.readable).reader().read(chain.readable_len)
                ack[0] = CTRL_OK if self._ctrl(data[0], data[1], data[2:]) else CTRL_ERR
            t.complete(CTRL_Q, chain, 1, notify=False)
            done += 1
        if done:
            t.notify_queue(CTRL_Q)

    def _ctrl(self, cls: int, cmd: int, data: bytes) -> bool:
        if cls == CTRL_RX and self.acked & F_CTRL_RX:
            if len(data) != 1 or cmd > CTRL_RX_NOBCAST:
                return False
            on = bool(data[0])
            attr = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")[cmd]
            setattr(self, attr, on)
            return True
        if cls == CTRL_MAC and cmd == CTRL_MAC_ADDR_SET and self.acked & F_CTRL_MAC_ADDR:
            if len(data) != 6 or data[0] & 1:
                return False
            self.mac = bytes(data)
            return True
        if cls == CTRL_MAC and cmd == CTRL_MAC_TABLE_SET and self.acked & F_CTRL_RX:
            tables = []
            pos = 0
            for _ in range(2):
                if pos + 4 > len(data):
                    return False
                (count,) = struct.unpack_from("<I", data, pos)
                pos += 4
                if count > len(data) // 6 or pos + 6 * count > len(data):
                    return False
                tables.append({data[pos + 6 * i:pos + 6 * i + 6] for i in range(count)})
                pos += 6 * count
            if pos != len(data):
                return False
            uni, multi = tables
            self.uni_table = uni if len(uni) <= MAC_TABLE_ENTRIES else set()
            self.multi_table = multi if len(multi) <= MAC_TABLE_ENTRIES else set()
            # a table too long for us: take everything of that kind, as QEMU does
            if len(uni) > MAC_TABLE_ENTRIES:
                self.alluni = True
            if len(multi) > MAC_TABLE_ENTRIES:
                self.allmulti = True
            return True
        return False
