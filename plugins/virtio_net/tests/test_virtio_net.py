"""virtio-net against fake guest memory, the mock virtio-net driver and loopback backends."""

from __future__ import annotations

import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrun_virtio_net.device import (
    CTRL_ERR,
    CTRL_MAC,
    CTRL_MAC_ADDR_SET,
    CTRL_MAC_TABLE_SET,
    CTRL_OK,
    CTRL_RX,
    CTRL_RX_ALLMULTI,
    CTRL_RX_NOBCAST,
    CTRL_RX_PROMISC,
    F_CSUM,
    F_CTRL_RX,
    F_CTRL_VQ,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_MAC,
    F_MRG_RXBUF,
    F_MTU,
    F_STATUS,
    GSO_TCPV4,
    GSO_UDP,
    HDR_F_NEEDS_CSUM,
    VirtioNet,
)

from vmrun.core.virtio.device import STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_RING_EVENT_IDX
from vmrun.core.virtio.pci import VirtioPciTransport
from vmrun.core.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmrun.net.backend import CAP_CSUM, CAP_TSO4, CAP_TSO6, CAP_VNET_HDR
from vmrun.testing import FakeVm
from vmrun.testing.nic import LoopbackBackend, VirtioNetDriver, ethernet, loopback_pair

SLOT = 5
MAC = bytes.fromhex("02aabbccdd01")
PEER = bytes.fromhex("02aabbccdd02")
VNET_CAPS = frozenset({CAP_VNET_HDR, CAP_CSUM, CAP_TSO4, CAP_TSO6})


class Nic:
    def __init__(self, vm: FakeVm, backend, slot: int = SLOT, features: int | None = None,
                 rx_buf: int = 1526) -> None:
        self.dev = VirtioNet(backend, MAC)
        self.t = VirtioPciTransport(self.dev)
        vm.pci.add(self.t, slot)
        vm.pci.assign_bars()
        self.drv = VirtioNetDriver(vm, slot, rx_buf=rx_buf)
        self.features = self.drv.setup(features)
        self.backend = backend


@pytest.fixture
def vm():
    v = FakeVm(memory=16 << 20)
    yield v
    v.close()


def frame(n: int = 60, dst: bytes = MAC, fill: int = 0x5A) -> bytes:
    return ethernet(dst, PEER, 0x0800, bytes([fill]) * (n - 14))


def test_features_config_and_link(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop)
    nic = Nic(vm, be)
    f = nic.features
    for bit in (F_MAC, F_STATUS, F_MTU, F_MRG_RXBUF, F_CTRL_VQ, F_CTRL_RX):
        assert f & bit
    for bit in (F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_GUEST_TSO4):
        assert not f & bit                   # no vnet_hdr: no offloads
    assert f & VIRTIO_F_RING_EVENT_IDX
    assert nic.drv.mac() == MAC
    assert nic.drv.config(6, 2) == 1         # link up
    assert nic.drv.config(10, 2) == 1500     # mtu
    gen = nic.drv.drv.common_read(0x15, 1)
    be.set_link(False)
    vm.sync()
    assert nic.drv.config(6, 2) == 0
    assert nic.drv.drv.common_read(0x15, 1) != gen
    be.set_link(True)
    vm.sync()
    assert nic.drv.config(6, 2) == 1


def test_offloads_follow_the_backend(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop, caps=VNET_CAPS)
    nic = Nic(vm, be)
    for bit in (F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_GUEST_TSO4):
        assert nic.features & bit
    assert be.offloads == {CAP_CSUM, CAP_TSO4, CAP_TSO6}
    be2 = LoopbackBackend(vm.loop, caps=frozenset({CAP_VNET_HDR, CAP_CSUM}))
    nic2 = Nic(vm, be2, slot=6)
    assert nic2.features & F_CSUM and not nic2.features & (F_HOST_TSO4 | F_HOST_TSO6)


def test_transmit_and_receive(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop)
    nic = Nic(vm, be)
    frames = [frame(60 + i * 29, fill=i) for i in range(40)]
    for f in frames:
        nic.drv.send(f, split=bool(len(f) % 2))
    assert be.wait_sent(40)
    assert be.sent == frames
    assert len(nic.drv.wait_tx_used(40)) == 40
    # receive is polled only once buffers are posted
    assert not be.rx_on
    for f in frames:
        be.inject(f)
    time.sleep(0.05)
    assert be.pending() == 40
    nic.drv.post_rx(16)
    got = nic.drv.wait_recv(16)
    assert [g[1] for g in got] == frames[:16]
    assert all(g[0][6] == 1 for g in got)               # num_buffers
    vm.sync()
    # dry: switched off; the rest wait in the backend
    assert not be.rx_on and be.pending() == 24
    nic.drv.post_rx()
    got = nic.drv.wait_recv(24)
    assert [g[1] for g in got] == frames[16:]
    assert nic.dev.rx_frames == 40 and nic.dev.tx_frames == 40


def test_mergeable_buffers_carry_a_large_frame(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop, mtu=9000)
    nic = Nic(vm, be, rx_buf=1024)
    big = frame(9014, fill=0x33)
    be.inject(big)
    nic.drv.post_rx(4)                                  # not enough for 9026 bytes
    time.sleep(0.05)
    assert nic.drv.recv() == []
    nic.drv.post_rx(8)
    got = nic.drv.wait_recv(1)
    assert got[0][1] == big and got[0][0][6] == 9                # 9026 / 1024 -> 9 buffers


def test_without_mergeable_buffers_a_too_large_frame_is_dropped(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop, mtu=9000)
    nic = Nic(vm, be, features=F_MAC | F_STATUS, rx_buf=1526)
    be.inject(frame(3000))
    be.inject(frame(100))
    nic.drv.post_rx(4)
    got = nic.drv.wait_recv(1)
    assert [len(g[1]) for g in got] == [100]
    assert nic.dev.rx_no_room + be.rx_dropped == 1


def test_two_nics_on_a_pair_talk(vm: FakeVm) -> None:
    a, b = loopback_pair(vm.loop)
    n1, n2 = Nic(vm, a, slot=5), Nic(vm, b, slot=6)
    n2.drv.post_rx()
    f = frame(200)
    n1.drv.send(f)
    assert n2.drv.wait_recv(1)[0][1] == f


def test_full_backend_holds_the_frame(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop)
    nic = Nic(vm, be)
    be.set_full(True)
    nic.drv.send(frame(80, fill=1))
    nic.drv.send(frame(80, fill=2))
    vm.sync()
    assert be.sent == [] and nic.drv.txq.get_used() == []
    be.set_full(False)
    assert be.wait_sent(2)
    assert [f[20] for f in be.sent] == [1, 2]


def test_bad_transmit_headers_drop_only_the_frame(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop, caps=VNET_CAPS)
    nic = Nic(vm, be)
    f = frame(1000)
    bad = [
        struct.pack("<BBHHHHH", 0x80, 0, 0, 0, 0, 0, 0),                    # unknown flag
        struct.pack("<BBHHHHH", HDR_F_NEEDS_CSUM, 0, 0, 0, 990, 16, 0),    # csum past end
        struct.pack("<BBHHHHH", HDR_F_NEEDS_CSUM, GSO_UDP, 54, 1400, 34, 6, 0),  # UFO
        struct.pack("<BBHHHHH", 0, GSO_TCPV4, 54, 1400, 34, 16, 0),        # GSO w/o csum
        struct.pack("<BBHHHHH", HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16, 0),   # size 0
        struct.pack("<BBHHHHH", HDR_F_NEEDS_CSUM, GSO_TCPV4, 5000, 1400, 34, 16, 0),
    ]
    for h in bad:
        nic.drv.send(f, hdr=h)
    nic.drv.send(b"short", hdr=bytes(12))
    good = struct.pack("<BBHHHHH", HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0)
    nic.drv.send(f, hdr=good)
    assert be.wait_sent(1)
    assert len(nic.drv.wait_tx_used(len(bad) + 2)) == len(bad) + 2
    assert be.sent == [good + f]
    assert nic.dev.tx_bad == len(bad) + 1
    assert not nic.t.status & STATUS_DEVICE_NEEDS_RESET


def test_receive_with_vnet_header_keeps_gso_only_when_accepted(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop, caps=VNET_CAPS)
    # the guest takes checksum offload but no TSO: a GSO frame from the host is dropped
    nic = Nic(vm, be, features=F_MAC | F_STATUS | F_MRG_RXBUF | F_GUEST_CSUM | F_CSUM)
    assert be.offloads == {CAP_CSUM}
    gso = struct.pack("<BBHHHHH", HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0)
    csum = struct.pack("<BBHHHHH", HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0)
    be.inject(gso + frame(3000))
    be.inject(csum + frame(100))
    nic.drv.post_rx()
    got = nic.drv.wait_recv(1)
    assert len(got) == 1 and got[0][0][0] == HDR_F_NEEDS_CSUM and len(got[0][1]) == 100


def test_control_queue_filters(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop)
    nic = Nic(vm, be)
    d = nic.drv
    other = bytes.fromhex("02000000aa01")
    mcast = bytes.fromhex("01005e000001")
    assert d.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0") == CTRL_OK
    assert d.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0\0") == CTRL_ERR
    assert d.ctrl(CTRL_RX, 9, b"\0") == CTRL_ERR
    assert d.ctrl(7, 0, b"") == CTRL_ERR
    table = struct.pack("<I", 1) + other + struct.pack("<I", 0)
    assert d.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, table) == CTRL_OK
    assert d.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, struct.pack("<I", 1000)) == CTRL_ERR
    d.post_rx()
    for dst in (MAC, other, bytes.fromhex("02000000aa02"), mcast, b"\xff" * 6):
        be.inject(frame(60, dst=dst))
    got = d.wait_recv(3)
    time.sleep(0.05)
    got += d.recv()
    assert [g[1][:6] for g in got] == [MAC, other, b"\xff" * 6]
    assert d.ctrl(CTRL_RX, CTRL_RX_ALLMULTI, b"\1") == CTRL_OK
    assert d.ctrl(CTRL_RX, CTRL_RX_NOBCAST, b"\1") == CTRL_OK
    be.inject(frame(60, dst=mcast))
    be.inject(frame(60, dst=b"\xff" * 6))
    got = d.wait_recv(1)
    time.sleep(0.05)
    got += d.recv()
    assert [g[1][:6] for g in got] == [mcast]
    new = bytes.fromhex("02123456789a")
    assert d.ctrl(CTRL_MAC, CTRL_MAC_ADDR_SET, new) == CTRL_OK
    assert d.mac() == new
    assert d.ctrl(CTRL_MAC, CTRL_MAC_ADDR_SET, b"\x01" * 6) == CTRL_ERR
    # a reset brings back the permanent MAC and the promiscuous default
    d.setup()
    assert d.mac() == MAC and nic.dev.promisc


def test_event_idx_suppresses_interrupts(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop)
    nic = Nic(vm, be)
    assert nic.features & VIRTIO_F_RING_EVENT_IDX
    d = nic.drv
    gsi = next(iter(sorted(vm.irqfds)))         # config vector; queues follow
    rx_gsi = sorted(vm.irqfds)[1]
    d.post_rx()
    be.inject(frame(60))
    assert len(d.wait_recv(1)) == 1
    vm.sync()
    assert vm.msi_count(rx_gsi) == 1
    # used_event ahead (interrupt once used passes entry 5): none for used 2..4
    vm.memory.write_u16(d.rxq.avail + 4 + 2 * d.rxq.size, 5)
    for i in range(3):
        be.inject(frame(60, fill=i))
    assert len(d.wait_recv(3)) == 3
    vm.sync()
    assert vm.msi_count(rx_gsi) == 0
    for i in range(2):
        be.inject(frame(60, fill=i))
    assert len(d.wait_recv(2)) == 2
    vm.sync()
    assert vm.msi_count(rx_gsi) == 1
    # the device publishes avail_event as it takes transmit buffers
    d.send(frame(60))
    assert be.wait_sent(1)
    avail_event = vm.memory.read_u16(d.txq.used + 4 + 8 * d.txq.size)
    assert avail_event == 1
    assert gsi != rx_gsi


def test_reset_stops_receive_and_reboot_reattaches(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop)
    nic = Nic(vm, be)
    nic.drv.post_rx()
    vm.sync()
    assert be.rx_on
    nic.drv.drv.common_write(0x14, 1, 0)         # reset
    assert not be.rx_on
    nic.t.close()                                # the boot ends: the NIC lets go ...
    assert be.cb is None and not be.closed       # ... the backend stays for the next one


def test_bad_receive_chain_breaks_only_the_device(vm: FakeVm) -> None:
    be = LoopbackBackend(vm.loop)
    nic = Nic(vm, be)
    q = nic.drv.rxq
    q.write_desc(0, 0x200000, 100, 0, 0)          # device-readable only: no room at all
    q.publish(0)
    nic.drv.drv.kick(0)
    be.inject(frame(60))
    end = time.monotonic() + 3
    while not nic.t.status & STATUS_DEVICE_NEEDS_RESET and time.monotonic() < end:
        time.sleep(0.01)
    assert nic.t.status & STATUS_DEVICE_NEEDS_RESET
    assert not vm.loop.faults or all(n != "?" for n, _ in vm.loop.faults)
    nic.drv.setup()
    nic.drv.post_rx()
    be.inject(frame(60, fill=9))
    got = nic.drv.wait_recv(2)                  # the frame from before the reset, then ours
    assert [g[1] for g in got] == [frame(60), frame(60, fill=9)]


# -- hostile rings --------------------------------------------------------------------------
_health = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
           HealthCheck.data_too_large]


@settings(max_examples=int(os.environ.get("NET_EXAMPLES", "60")), deadline=None,
          suppress_health_check=_health)
@given(chains=st.lists(st.tuples(
    st.sampled_from(["rx", "tx"]),
    st.lists(st.tuples(st.integers(0, (16 << 20) + 4096), st.integers(0, 70000),
                       st.booleans()), min_size=1, max_size=5),
    st.binary(min_size=0, max_size=12)), max_size=12),
    inject=st.lists(st.integers(0, 70000), max_size=6))
def test_hostile_chains_never_escape(chains, inject) -> None:
    vm = FakeVm(memory=16 << 20)
    try:
        be = LoopbackBackend(vm.loop, caps=VNET_CAPS)
        nic = Nic(vm, be)
        for n in inject:
            be.inject(bytes(12) + frame(max(60, min(n, 65000))))
        for which, descs, hdr in chains:
            q = nic.drv.rxq if which == "rx" else nic.drv.txq
            head = q.free
            idxs = [(head + k) % q.size for k in range(len(descs))]
            for k, (addr, length, write) in enumerate(descs):
                if hdr and addr + len(hdr) < vm.memory.size:
                    vm.memory.write(addr, hdr)
                last = k == len(descs) - 1
                q.write_desc(idxs[k], addr, length,
                             (VIRTQ_DESC_F_WRITE if write else 0) |
                             (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else idxs[k + 1])
            q.free = (head + len(descs)) % q.size
            q.publish(head)
            nic.drv.drv.kick(0 if which == "rx" else 1)
        vm.sync(30)                       # generous: this host is often busy
        time.sleep(0.01)
        vm.sync(30)
        assert all(name != "?" for name, _ in vm.loop.faults)
        # recovery: reset, set up, one frame each way
        nic.drv.setup()
        nic.drv.post_rx()
        be.inject(bytes(12) + frame(60, fill=7))
        end = time.monotonic() + 20         # generous: this host is often busy
        got: list = []
        while frame(60, fill=7) not in [g[1] for g in got] and time.monotonic() < end:
            got += nic.drv.recv()
            nic.drv.post_rx()
            time.sleep(0.002)
        assert frame(60, fill=7) in [g[1] for g in got]
        be.sent.clear()
        nic.drv.send(frame(60, fill=8))
        assert be.wait_sent(1, 20) and be.sent[-1] == bytes(12) + frame(60, fill=8)
    finally:
        vm.close()


# -- snapshots ---------------------------------------------------------------------------
def moved_driver(nic: Nic, b: FakeVm) -> None:
    """The mock driver, unaware of the move, goes on with the same rings in ``b``'s RAM."""
    from vmrun.testing.virtio import VirtioDriver

    d = nic.drv
    queues = d.drv.queues
    for q in queues:
        q.mem = b.memory
    d.vm, d.mem = b, b.memory
    d.drv = VirtioDriver(b, SLOT)
    d.drv.queues = queues


def test_state_moves_to_a_fresh_device_mid_frame() -> None:
    """Filters set through the control queue, a 9000-byte frame half delivered into the
    four receive buffers it holds, two transmit frames the backend has not taken: saved,
    JSON round-tripped, loaded into a fresh device on a copy of the RAM, which finishes the
    frame into the next buffers, sends the held frames and keeps filtering as told."""
    import json

    a, b = FakeVm(), FakeVm()
    try:
        be = LoopbackBackend(a.loop, mtu=9000)
        nic = Nic(a, be, rx_buf=1024)
        d = nic.drv
        other = bytes.fromhex("02000000aa01")
        new = bytes.fromhex("02123456789a")
        assert d.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\0") == CTRL_OK
        assert d.ctrl(CTRL_RX, CTRL_RX_NOBCAST, b"\1") == CTRL_OK
        table = struct.pack("<I", 1) + other + struct.pack("<I", 0)
        assert d.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, table) == CTRL_OK
        assert d.ctrl(CTRL_MAC, CTRL_MAC_ADDR_SET, new) == CTRL_OK
        big = frame(9014, dst=new, fill=0x33)
        be.inject(big)
        d.post_rx(4)                                  # 4 KiB of the 9026 bytes: held
        be.set_full(True)
        d.send(frame(80, fill=1))
        d.send(frame(80, fill=2))
        a.sync()
        assert d.recv() == [] and nic.dev._rx_pending and len(nic.dev._rx_chains) == 4
        state = json.loads(json.dumps(a.pci.save_state()))
        b.memory.write(0, a.memory.read(0, a.memory.size))
        be2 = LoopbackBackend(b.loop, mtu=9000)
        dev2 = VirtioNet(be2, MAC)
        t2 = VirtioPciTransport(dev2)
        b.pci.add(t2, SLOT)
        b.pci.assign_bars()
        b.pci.load_state(state)
        b.sync()
        moved_driver(nic, b)
        assert be2.wait_sent(2) and [f[20] for f in be2.sent] == [1, 2]
        assert len(d.wait_tx_used(2)) == 2
        d.post_rx(8)
        got = d.wait_recv(1)
        assert got[0][1] == big and got[0][0][6] == 9
        assert d.mac() == new
        for dst in (other, bytes.fromhex("02000000aa02"), b"\xff" * 6, new):
            be2.inject(frame(60, dst=dst))
        got = d.wait_recv(2)
        time.sleep(0.05)
        got += d.recv()
        assert [g[1][:6] for g in got] == [other, new]
    finally:
        a.close()
        b.close()


def test_a_link_that_went_down_across_the_restore_is_signalled() -> None:
    """The driver saw the link up; the restored run's backend has it down: the status
    reads down and the configuration generation moves (a config change the driver sees)."""
    import json

    a, b = FakeVm(), FakeVm()
    try:
        nic = Nic(a, LoopbackBackend(a.loop))
        gen = nic.drv.drv.common_read(0x15, 1)
        state = json.loads(json.dumps(a.pci.save_state()))
        b.memory.write(0, a.memory.read(0, a.memory.size))
        be2 = LoopbackBackend(b.loop)
        be2.link_up = False
        b.pci.add(VirtioPciTransport(VirtioNet(be2, MAC)), SLOT)
        b.pci.assign_bars()
        b.pci.load_state(state)
        b.sync()
        moved_driver(nic, b)
        assert nic.drv.config(6, 2) == 0
        assert nic.drv.drv.common_read(0x15, 1) != gen
    finally:
        a.close()
        b.close()


def test_a_state_of_another_version_is_refused(vm: FakeVm) -> None:
    nic = Nic(vm, LoopbackBackend(vm.loop))
    state = nic.dev.save_state()
    state["version"] = 99
    with pytest.raises(ValueError, match="virtio-net: state version 99, this vmrun has 1"):
        VirtioNet(LoopbackBackend(vm.loop), MAC).load_state(state)
