"""The e1000 (82545EM) against a mock Linux-style driver on fake guest memory, with the
in-memory loopback backend as the host side of the link."""

from __future__ import annotations

import logging
import struct
import time
import zlib

import pytest
from vmrun_e1000 import eeprom, phy
from vmrun_e1000.device import E1000
from vmrun_e1000.offload import Context, ones_sum, segment

from vmrun.testing import FakeVm, PciDriver
from vmrun.testing.e1000 import (
    CTRL,
    CTRL_RST,
    CTRL_VME,
    ICR_LSC,
    ICR_RXT0,
    ICR_TXDW,
    ICS,
    IMC,
    IMS,
    ITR,
    RCTL,
    RCTL_BAM,
    RCTL_LPE,
    RCTL_MPE,
    RCTL_SECRC,
    RCTL_UPE,
    RCTL_VFE,
    RDH,
    RDT,
    RXCSUM,
    RXD_DD,
    RXD_EOP,
    RXD_ERR_IPE,
    RXD_ERR_TCPE,
    RXD_IPCS,
    RXD_IXSM,
    RXD_TCPCS,
    RXD_VP,
    STATUS,
    STATUS_LU,
    TDH,
    TDT,
    VFTA,
    E1000Driver,
    Offload,
    checksums_ok,
    inet_checksum,
    ip_packet,
    tcp_header,
    udp_header,
)
from vmrun.testing.nic import LoopbackBackend

SLOT = 5
MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("02aabbccddee")
BCAST = b"\xff" * 6


class Nic:
    def __init__(self, caps: frozenset[str] = frozenset(), memory: int = 64 << 20,
                 up: bool = True, **up_args) -> None:
        self.vm = FakeVm(memory)
        self.be = LoopbackBackend(self.vm.loop, caps=caps)
        self.dev = E1000(self.be, MAC)
        self.vm.pci.add(self.dev, SLOT)
        self.vm.pci.assign_bars()
        self.drv = E1000Driver(self.vm, SLOT)
        self.drv.reset()
        if up:
            self.drv.up(**up_args)

    def sent(self, n: int, timeout: float = 5.0) -> list[bytes]:
        assert self.be.wait_sent(n, timeout), f"{len(self.be.sent)} of {n} frames sent"
        return self.be.sent[:n]

    def settle(self) -> None:
        """Wait until the NIC has taken and handled every injected frame."""
        assert self.be.wait_taken()
        self.vm.sync()

    def close(self) -> None:
        self.vm.close()


@pytest.fixture
def nic():
    n = Nic()
    yield n
    n.close()


def frame(dst: bytes = PEER, size: int = 100, fill: bytes = b"x", ethertype: int = 0x88B5
          ) -> bytes:
    return dst + MAC + struct.pack(">H", ethertype) + (fill * size)[:size - 14]


def to_us(size: int = 200, fill: bytes = b"y", dst: bytes = MAC) -> bytes:
    return dst + PEER + b"\x88\xb5" + (fill * size)[:size - 14]


def wait(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("condition never came true")
        time.sleep(0.001)


# -- identity, EEPROM, PHY ----------------------------------------------------------------
def test_pci_identity_and_bars():
    n = Nic(up=False)
    try:
        pci = PciDriver(n.vm)
        assert pci.scan()[(SLOT, 0)] == (0x8086, 0x100F)
        assert pci.read(SLOT, 0, 0x08) >> 8 == 0x020000          # Ethernet controller
        assert pci.read(SLOT, 0, 0x2C) == 0x1001 << 16 | 0x8086   # subsystem
        assert pci.read(SLOT, 0, 0x3D, 1) == 1                     # INTA#
        assert pci.bar_size(SLOT, 0, 0) == 0x20000                 # registers
        assert pci.bar_size(SLOT, 0, 1) == 0x40                    # I/O window
        assert pci.read(SLOT, 0, 0x14) & 1                         # BAR 1 is I/O
    finally:
        n.close()


def test_eeprom_microwire_and_eerd():
    n = Nic(up=False)
    try:
        words = n.drv.eeprom_read(0, 64)                 # bit by bit, as Linux reads it
        assert sum(words) & 0xFFFF == eeprom.CHECKSUM     # e1000_validate_eeprom_checksum
        assert n.drv.mac_address() == MAC
        assert words[0x0D] == 0x100F and words[0x0E] == 0x8086
        for i in (0, 1, 2, 0x0F, 0x3F):                  # a word at a time, as Windows may
            assert n.drv.eeprom_read_eerd(i) == words[i]
        assert n.drv.eeprom_read(0x3E, 1) == [words[0x3E]]
    finally:
        n.close()


def test_eeprom_sequential_read_and_address_wrap():
    mw = eeprom.Microwire(list(range(0x100, 0x140)))

    def clock(di: int) -> int:
        mw.write(eeprom.EECD_CS | (eeprom.EECD_DI if di else 0))
        mw.write(eeprom.EECD_CS | eeprom.EECD_SK | (eeprom.EECD_DI if di else 0))
        return bool(mw.read() & eeprom.EECD_DO)

    mw.write(eeprom.EECD_CS)
    for bit in [1, 1, 0] + [1] * 6:                      # READ word 0x3F
        clock(bit)
    assert not mw.read() & eeprom.EECD_DO               # the dummy zero
    got = [sum(clock(0) << (15 - b) for b in range(16)) for _ in range(2)]
    assert got == [0x13F, 0x100]                         # then on with word 0
    mw.write(0)                                          # CS low: the command ends
    assert mw.read() & eeprom.EECD_DO


def test_phy_identity_link_and_errors(nic):
    d = nic.drv
    assert d.phy_read(phy.PHY_ID1) << 16 | d.phy_read(phy.PHY_ID2) == 0x01410C20
    d.phy_read(phy.PHY_STATUS)
    st = d.phy_read(phy.PHY_STATUS)
    assert st & phy.MII_SR_LINK_STATUS and st & phy.MII_SR_AUTONEG_COMPLETE
    assert d.phy_read(phy.M88_PHY_SPEC_STATUS) == phy.M88_STATUS_1000_FD
    assert d.phy_read(phy.PHY_LP_ABILITY) == phy.LP_ABILITY
    assert d.rd(STATUS) & STATUS_LU
    with pytest.raises(OSError):                         # no PHY at MDIO address 2
        d.phy_read(1, phy=2)
    # Writable registers keep what is written; read-only ones do not move.
    d.phy_write(phy.PHY_AUTONEG_ADV, 0x01E1)
    assert d.phy_read(phy.PHY_AUTONEG_ADV) == 0x01E1
    d.phy_write(phy.PHY_ID1, 0)
    assert d.phy_read(phy.PHY_ID1) == 0x0141
    # Soft reset and autonegotiation restart self-clear and complete.
    d.phy_write(phy.PHY_CTRL, 0x1140 | phy.MII_CR_RESET)
    assert not d.phy_read(phy.PHY_CTRL) & phy.MII_CR_RESET
    d.phy_write(phy.PHY_CTRL, 0x1140 | phy.MII_CR_RESTART_AUTO_NEG)
    assert d.phy_read(phy.PHY_STATUS) & phy.MII_SR_AUTONEG_COMPLETE


def test_phy_power_down_drops_the_link(nic):
    d = nic.drv
    d.icr()
    d.phy_write(phy.PHY_CTRL, 0x1140 | phy.MII_CR_POWER_DOWN)
    assert not d.rd(STATUS) & STATUS_LU
    assert d.icr() & ICR_LSC
    d.phy_write(phy.PHY_CTRL, 0x1140 | phy.MII_CR_RESTART_AUTO_NEG)
    assert d.rd(STATUS) & STATUS_LU
    assert d.icr() & ICR_LSC


def test_link_follows_the_backend(nic):
    d = nic.drv
    d.icr()
    nic.be.set_link(False)
    wait(lambda: not d.rd(STATUS) & STATUS_LU)
    wait(lambda: d.irq)
    assert d.icr() & ICR_LSC
    assert not d.irq
    assert not d.phy_read(phy.PHY_STATUS) & phy.MII_SR_LINK_STATUS
    nic.be.set_link(True)
    wait(lambda: d.rd(STATUS) & STATUS_LU)
    assert d.icr() & ICR_LSC
    assert d.phy_read(phy.PHY_STATUS) & phy.MII_SR_LINK_STATUS
    # The status register's link bit latches low: the first read after a drop says down
    # even when the link is back (why drivers read it twice).
    nic.be.set_link(False)
    nic.be.set_link(True)
    wait(lambda: d.icr() & ICR_LSC)
    assert not d.phy_read(phy.PHY_STATUS) & phy.MII_SR_LINK_STATUS
    assert d.phy_read(phy.PHY_STATUS) & phy.MII_SR_LINK_STATUS


# -- transmit -------------------------------------------------------------------------------
def test_transmit_legacy_split_buffers(nic):
    f = frame(size=1514)
    nic.drv.send(f, split=[14, 100, 1, 999, 400])
    nic.drv.wait_tx()
    assert nic.sent(1) == [f]
    assert nic.drv.rd(TDH) == nic.drv.rd(TDT) == 5


def test_short_frames_go_out_unpadded(nic):
    """TCTL.PSP pads on a wire; a virtual link carries the frame as it is (passt takes
    padding for TCP data), and the receiving NIC pads it."""
    nic.drv.send(frame(size=42))
    assert nic.sent(1) == [frame(size=42)]


def test_transmit_interrupt_and_ring_wrap(nic):
    d = nic.drv
    d.icr()
    for i in range(150):                                 # more than the 64-entry ring
        d.send(frame(size=64 + i))
        d.wait_tx()
    assert [len(f) for f in nic.sent(150)] == [64 + i for i in range(150)]
    wait(lambda: d.irq)
    assert d.icr() & ICR_TXDW
    assert not d.irq


def test_legacy_checksum_insertion(nic):
    pkt = ip_packet(MAC, PEER, 17, udp_header() + b"data" * 10, l4_csum=False)
    # IC: checksum from CSS to the end, stored at CSO (here over the UDP header and data,
    # seeded with the pseudo-header sum as a driver would).
    seeded = ip_packet(MAC, PEER, 17, udp_header() + b"data" * 10, seed=True)
    seeded = seeded[:14] + pkt[14:34] + seeded[34:]      # IPv4 header complete
    nic.drv.send(seeded, legacy_csum=(34, 40))
    got = nic.sent(1)[0]
    assert checksums_ok(got)
    assert got[:40] == seeded[:40] and got[42:] == seeded[42:]


@pytest.mark.parametrize("proto", [6, 17])
@pytest.mark.parametrize("v6", [False, True])
def test_context_checksum_offload(nic, proto, v6):
    l4 = (tcp_header() if proto == 6 else udp_header()) + bytes(range(256)) * 3
    pkt = ip_packet(MAC, PEER, proto, l4, v6=v6, seed=True)
    l4off = 14 + (40 if v6 else 20)
    off = Offload(ipcss=14, ipcso=24, ipcse=33, tucss=l4off,
                  tucso=l4off + (16 if proto == 6 else 6), tcp=proto == 6, ipv4=not v6)
    nic.drv.send(pkt, split=[30, 300], offload=off, ip_csum=not v6, l4_csum=True)
    got = nic.sent(1)[0]
    assert len(got) == len(pkt)
    assert checksums_ok(got)


def _tso_packet(payload: int, v6: bool = False, flags: int = 0x19):
    data = bytes((i * 7) & 0xFF for i in range(payload))
    pkt = ip_packet(MAC, PEER, 6, tcp_header(seq=0xFFFFF000, flags=flags) + data, v6=v6,
                    seed=True, seed_len=False)
    if not v6:   # Linux: tot_len 0, check 0 (the device fills them in per segment)
        pkt = pkt[:16] + b"\0\0" + pkt[18:]
    l4off = 14 + (40 if v6 else 20)
    off = Offload(ipcss=14, ipcso=24, ipcse=0 if v6 else 33, tucss=l4off, tucso=l4off + 16,
                  tcp=True, ipv4=not v6, tso=True, mss=1448, hdr_len=l4off + 20)
    return pkt, off, data


def _check_segments(frames: list[bytes], data: bytes, v6: bool, mss: int = 1448) -> None:
    l4off = 14 + (40 if v6 else 20)
    assert len(frames) == -(-len(data) // mss)
    joined = b""
    for i, f in enumerate(frames):
        assert checksums_ok(f), f"segment {i}: bad checksum"
        if v6:
            assert struct.unpack_from(">H", f, 18)[0] == len(f) - 54
        else:
            assert struct.unpack_from(">H", f, 16)[0] == len(f) - 14
            assert struct.unpack_from(">H", f, 18)[0] == (0x1234 + i) & 0xFFFF
        seq = struct.unpack_from(">I", f, l4off + 4)[0]
        assert seq == (0xFFFFF000 + i * mss) & 0xFFFFFFFF             # wraps at 2**32
        fl = f[l4off + 13]
        last = i == len(frames) - 1
        assert bool(fl & 0x01) == last and bool(fl & 0x08) == last    # FIN, PSH on last
        assert fl & 0x10                                              # ACK on every one
        joined += f[l4off + 20:]
    assert joined == data


@pytest.mark.parametrize("v6", [False, True])
def test_tso_segments_in_the_device(nic, v6):
    pkt, off, data = _tso_packet(20000, v6)
    idx = nic.drv.send(pkt, split=[off.hdr_len - 10, 10, 4096, 4096, 4096], offload=off,
                       ip_csum=not v6, l4_csum=True)
    nic.drv.wait_tx(idx)
    frames = nic.sent(14)
    _check_segments(frames, data, v6)
    assert all(len(f) <= off.hdr_len + off.mss for f in frames)


def test_tso_then_checksum_contexts_are_kept_apart(nic):
    pkt, off, data = _tso_packet(3000)
    # A checksum context for UDP, then the TSO context, then a UDP packet without a new
    # context: it must use the checksum context, not the TSO one.
    udp = ip_packet(MAC, PEER, 17, udp_header() + b"u" * 50, seed=True)
    csum = Offload(ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=40, tcp=False)
    nic.drv.send(udp, offload=csum, ip_csum=True, l4_csum=True)
    nic.drv.send(pkt, offload=off, ip_csum=True, l4_csum=True)
    nic.sent(4)
    nic.drv._tx_desc(0, 0, 0)    # placeholder, replaced below
    nic.drv.tx_next -= 1
    bufs = nic.drv._buffers(udp, None)
    a, n = bufs[0]
    nic.drv._tx_desc(a, n | 1 << 20 | (0x20 | 0x0B) << 24, 0x3 << 8)   # DEXT data, no TSE
    nic.drv.kick()
    got = nic.sent(5)[4]
    assert checksums_ok(got) and len(got) == len(udp)


def test_tso_with_bad_context_drops_only_that_packet(nic):
    pkt, off, _ = _tso_packet(3000)
    off.hdr_len = 10                                  # the TCP header is past it
    nic.drv.send(pkt, offload=off, ip_csum=True, l4_csum=True)
    nic.drv.wait_tx()
    nic.drv.send(frame())
    assert nic.sent(1) == [frame()]
    assert not nic.dev.broken
    assert nic.drv.rd(0x40FC) == 1                    # TSCTFC


def test_vlan_insertion_and_stripping(nic):
    d = nic.drv
    d.wr(CTRL, d.rd(CTRL) | CTRL_VME)
    f = frame(size=100)
    d.send(f, vlan=0x2005)
    got = nic.sent(1)[0]
    assert got == f[:12] + b"\x81\x00\x20\x05" + f[12:]
    nic.be.inject(to_us()[:12] + b"\x81\x00\x30\x07" + to_us()[12:])
    [(data, status, _e, special)] = d.receive(1)
    assert data == to_us() and status & RXD_VP and special == 0x3007
    # The VLAN filter: only VIDs set in VFTA pass.
    d.wr(RCTL, d.rd(RCTL) | RCTL_VFE)
    d.wr(VFTA + 4 * (0x007 >> 5), 1 << (0x007 & 31))
    nic.be.inject(to_us()[:12] + b"\x81\x00\x00\x08" + to_us()[12:])   # VID 8: dropped
    nic.be.inject(to_us()[:12] + b"\x81\x00\x00\x07" + to_us()[12:])   # VID 7: passes
    [(data, status, _e, special)] = d.receive(1)
    nic.settle()
    assert special == 7 and not d.receive(0)


def test_gso_passthrough_to_a_vnet_backend():
    n = Nic(caps=frozenset({"vnet_hdr", "csum", "tso4"}))
    try:
        pkt, off, data = _tso_packet(20000)
        n.drv.send(pkt, offload=off, ip_csum=True, l4_csum=True)
        [got] = n.sent(1)
        flags, gso, hdr_len, gso_size, cstart, coff, _ = struct.unpack_from("<BBHHHHH", got)
        assert (flags, gso, hdr_len, gso_size, cstart, coff) == (1, 1, 54, 1448, 34, 16)
        big = got[12:]
        assert struct.unpack_from(">H", big, 16)[0] == len(big) - 14
        assert inet_checksum(big[14:34]) == 0
        # Segmenting it as the host would gives valid segments (the partial TCP checksum
        # is the pseudo-header sum with the whole length).
        c = Context(ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=50, tucmd=0x03,
                    hdr_len=54, mss=1448)
        b = bytearray(big)
        seed = struct.unpack_from(">H", b, 50)[0]
        struct.pack_into(">H", b, 50, (seed - (len(big) - 34)) % 0xFFFF)
        b[16:18] = b[24:26] = b"\0\0"
        _check_segments([bytes(f) for f in segment(bytes(b), c, True, True)], data, False)
        # A plain checksum offload leaves the TCP checksum to the backend (NEEDS_CSUM).
        udp = ip_packet(MAC, PEER, 17, udp_header() + b"u" * 50, seed=True)
        csum = Offload(ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=40, tcp=False)
        n.drv.send(udp, offload=csum, ip_csum=True, l4_csum=True)
        got = n.sent(2)[1]
        assert struct.unpack_from("<BBHHHH", got)[:1] == (1,)
        assert struct.unpack_from("<HH", got, 6) == (34, 6)
        assert got[12 + 40:12 + 42] == udp[40:42]       # the seed, untouched
    finally:
        n.close()


def test_backend_full_holds_the_packet_and_its_descriptor(nic):
    nic.be.set_full(True)
    idx = nic.drv.send(frame())
    time.sleep(0.05)
    assert not nic.drv.tx_done(idx) and not nic.be.sent
    nic.be.set_full(False)
    nic.drv.wait_tx(idx)
    assert nic.sent(1) == [frame()]


# -- receive -------------------------------------------------------------------------------
def test_receive_with_fcs_and_secrc(nic):
    d = nic.drv
    f = to_us(300)
    nic.be.inject(f)
    wait(lambda: d.irq)
    assert d.icr() & ICR_RXT0
    desc = nic.vm.memory.read(d.rx_ring, 16)
    addr, length = struct.unpack_from("<QH", desc)
    assert length == 304                              # the FCS is in the buffer
    assert nic.vm.memory.read(addr + 300, 4) == zlib.crc32(f).to_bytes(4, "little")
    [(data, status, errors, _)] = d.receive(1)
    assert data == f and status & (RXD_DD | RXD_EOP) == RXD_DD | RXD_EOP and errors == 0
    d.wr(RCTL, d.rd(RCTL) | RCTL_SECRC)
    nic.be.inject(f)
    assert d.receive(1)[0][0] == f


def test_receive_pads_runts(nic):
    nic.be.inject(to_us(42))
    [(data, *_)] = nic.drv.receive(1)
    assert data == to_us(42) + bytes(18)


def test_receive_filters(nic):
    d = nic.drv
    other = bytes.fromhex("020000000099")
    mcast = bytes.fromhex("01005e000001")
    for dst in (other, mcast, BCAST):
        nic.be.inject(to_us(dst=dst))
    nic.be.inject(to_us(fill=b"m"))
    got = d.receive(2)
    assert [g[0][:6] for g in got] == [BCAST, MAC]        # BAM on; others filtered
    d.set_mta(mcast)                                       # the multicast hash
    d.set_rar(3, other)                                    # a second exact address
    nic.be.inject(to_us(dst=mcast))
    nic.be.inject(to_us(dst=other))
    assert [g[0][:6] for g in d.receive(2)] == [mcast, other]
    d.set_rar(3, other, valid=False)
    d.wr(RCTL, d.rd(RCTL) & ~RCTL_BAM)
    nic.be.inject(to_us(dst=BCAST))
    nic.be.inject(to_us(dst=other))
    nic.settle()
    assert not d.receive(0)
    d.wr(RCTL, d.rd(RCTL) | RCTL_UPE)                      # unicast promiscuous
    nic.be.inject(to_us(dst=other))
    nic.be.inject(to_us(dst=bytes.fromhex("330000007788")))
    assert [g[0][:6] for g in d.receive(1)] == [other]
    d.wr(RCTL, d.rd(RCTL) | RCTL_MPE)                      # multicast promiscuous
    nic.be.inject(to_us(dst=bytes.fromhex("330000007788")))
    assert len(d.receive(1)) == 1


@pytest.mark.parametrize("mo", [0, 1, 2, 3])
def test_multicast_offset_modes(nic, mo):
    d = nic.drv
    d.wr(RCTL, d.rd(RCTL) | mo << 12)
    group = bytes.fromhex("01005e7f1234")
    d.set_mta(group, mo)
    nic.be.inject(to_us(dst=bytes.fromhex("01005e000000")))
    nic.be.inject(to_us(dst=group))
    nic.settle()
    got = d.receive(0)
    assert [g[0][:6] for g in got] == [group]


def test_small_buffers_chain_descriptors():
    n = Nic(bufsize=256)
    try:
        f = to_us(1514)
        n.be.inject(f)
        assert n.drv.receive(1) == [(f, RXD_DD | RXD_EOP | RXD_IXSM, 0, 0)]
        assert n.drv.rd(RDH) == 6                          # 1518 bytes in 256-byte buffers
    finally:
        n.close()


def test_long_packets_need_lpe():
    n = Nic(bufsize=4096)
    try:
        big = to_us(4000)
        n.be.inject(big)
        n.be.inject(to_us(1519))                          # 1523 with the FCS: long
        n.be.inject(to_us(1518))                          # 1522 with it: still short
        n.settle()
        assert [len(g[0]) for g in n.drv.receive(0)] == [1518]
        assert n.drv.rd(0x40AC) == 2                       # ROC
        n.drv.wr(RCTL, n.drv.rd(RCTL) | RCTL_LPE)
        n.be.inject(big)
        assert n.drv.receive(1)[0][0] == big
    finally:
        n.close()


def test_receive_checksum_offload(nic):
    d = nic.drv
    good = ip_packet(PEER, MAC, 6, tcp_header() + b"p" * 500)
    nic.be.inject(good)
    [(_, status, errors, _)] = d.receive(1)
    assert status & RXD_IPCS and status & RXD_TCPCS and not errors
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    nic.be.inject(bytes(bad))
    [(_, status, errors, _)] = d.receive(1)
    assert errors == RXD_ERR_TCPE
    bad = bytearray(good)
    bad[14 + 8] ^= 1                                      # the IPv4 TTL
    nic.be.inject(bytes(bad))
    [(_, status, errors, _)] = d.receive(1)
    assert errors & RXD_ERR_IPE
    v6 = ip_packet(PEER, MAC, 17, udp_header() + b"q" * 99, v6=True)
    nic.be.inject(v6)
    [(_, status, errors, _)] = d.receive(1)
    assert status & RXD_TCPCS and not errors
    d.wr(RXCSUM, 0)                                       # offload off: IXSM
    nic.be.inject(good)
    [(_, status, errors, _)] = d.receive(1)
    assert status & RXD_IXSM and not status & (RXD_TCPCS | RXD_IPCS)


def test_receive_completes_a_partial_checksum_from_a_vnet_backend():
    n = Nic(caps=frozenset({"vnet_hdr"}))
    try:
        pkt = ip_packet(PEER, MAC, 6, tcp_header() + b"z" * 300, seed=True)
        pkt = pkt[:14] + ip_packet(PEER, MAC, 6, tcp_header() + b"z" * 300)[14:34] + pkt[34:]
        hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 16, 0)
        n.be.inject(hdr + pkt)
        [(data, status, errors, _)] = n.drv.receive(1)
        assert checksums_ok(data) and status & RXD_TCPCS and not errors
    finally:
        n.close()


def test_no_buffers_holds_frames_until_posted(nic):
    d = nic.drv
    for i in range(80):                                   # 63 buffers posted
        nic.be.inject(to_us(100 + i))
    wait(lambda: d.rd(RDH) == 63)
    time.sleep(0.05)
    assert nic.be.pending() > 0 and not nic.be.rx_on
    got = d.receive(80)                                   # reposting brings the rest
    assert [len(g[0]) for g in got] == [100 + i for i in range(80)]
    assert d.rd(0x4010) == 0                              # MPC: nothing lost


def test_receive_off_means_no_polling(nic):
    d = nic.drv
    d.wr(RCTL, d.rd(RCTL) & ~2)
    nic.vm.sync()
    assert not nic.be.rx_on
    nic.be.inject(to_us())
    time.sleep(0.05)
    assert nic.be.pending() == 1
    d.wr(RCTL, d.rd(RCTL) | 2)
    assert len(d.receive(1)) == 1


# -- interrupts ----------------------------------------------------------------------------
def test_icr_ims_imc_ics(nic):
    d = nic.drv
    d.icr()
    d.wr(IMC, 0xFFFFFFFF)
    d.wr(ICS, ICR_LSC)
    assert not d.irq                                      # masked
    assert d.rd(IMS) == 0
    d.wr(IMS, ICR_LSC)
    assert d.irq                                          # pending and now unmasked
    assert d.icr() == ICR_LSC                             # read clears...
    assert not d.irq and d.icr() == 0                     # ...and lowers INTA#
    d.wr(ICS, ICR_TXDW)
    assert not d.irq
    d.wr(0x00C0, ICR_TXDW)                                # write 1 to clear
    assert d.icr() == 0


def test_itr_spaces_interrupts(nic):
    d = nic.drv
    d.icr()
    d.wr(ITR, 39063)                                      # 256 ns units: 10 ms apart
    d.wr(ICS, ICR_LSC)
    assert d.irq
    t0 = time.monotonic()
    d.icr()
    d.wr(ICS, ICR_LSC)
    assert not d.irq                                      # too soon: held back
    wait(lambda: d.irq)
    assert time.monotonic() - t0 >= 0.008
    d.icr()
    d.wr(ITR, 0)
    time.sleep(0.011)
    d.wr(ICS, ICR_LSC)
    assert d.irq


def test_receive_delay_timers():
    n = Nic(rdtr=20000, radv=0)                          # ~20 ms packet timer
    try:
        d = n.drv
        d.icr()
        t0 = time.monotonic()
        n.be.inject(to_us())
        wait(lambda: d.rd(RDH) == 1)
        assert not d.irq
        wait(lambda: d.irq)
        assert time.monotonic() - t0 >= 0.015
        assert d.icr() & ICR_RXT0
        # The absolute timer bounds the delay while packets keep restarting the other.
        d.wr(0x2820, 30000)                               # RDTR ~30 ms
        d.wr(0x282C, 5000)                                # RADV ~5 ms
        t0 = time.monotonic()
        n.be.inject(to_us())
        wait(lambda: d.irq)
        assert time.monotonic() - t0 < 0.025
        d.icr()
        # Flush partial descriptor: RDTR with FPD fires the timer at once.
        n.be.inject(to_us())
        wait(lambda: d.rd(RDH) == 3)
        d.wr(0x2820, 30000 | 1 << 31)
        wait(lambda: d.irq, timeout=0.02)
    finally:
        n.close()


def test_transmit_delay_timer():
    n = Nic(tidv=20000, tadv=0)
    try:
        d = n.drv
        d.icr()
        t0 = time.monotonic()
        idx = d.send(frame(), ide=True)
        d.wait_tx(idx)
        assert not d.irq
        wait(lambda: d.irq)
        assert time.monotonic() - t0 >= 0.015
        assert d.icr() & ICR_TXDW
        d.send(frame())                                   # no IDE: at once
        wait(lambda: d.irq, timeout=0.5)
    finally:
        n.close()


def test_intx_disable_in_the_command_register(nic):
    pci = PciDriver(nic.vm)
    pci.write(SLOT, 0, 0x04, 2, pci.read(SLOT, 0, 0x04, 2) | 1 << 10)
    nic.drv.icr()
    nic.drv.wr(ICS, ICR_LSC)
    assert not nic.drv.irq
    assert pci.read(SLOT, 0, 0x06, 2) & 1 << 3          # the status bit still says so
    pci.write(SLOT, 0, 0x04, 2, pci.read(SLOT, 0, 0x04, 2) & ~(1 << 10))
    assert nic.drv.irq


# -- statistics ----------------------------------------------------------------------------
def test_statistics_count_and_clear_on_read(nic):
    d = nic.drv
    for size in (60, 100, 1514):
        d.send(frame(size=size))
    d.send(frame(dst=BCAST))
    d.send(frame(dst=bytes.fromhex("01005e000001")))
    nic.sent(5)
    nic.be.inject(to_us(100))
    nic.be.inject(to_us(100, dst=BCAST))
    nic.be.inject(to_us(100, dst=bytes.fromhex("020000000001")))   # filtered out
    d.receive(2)
    assert d.rd(0x4080) == 5                              # GPTC
    assert d.rd(0x40D4) == 5                              # TPT
    gotc = d.rd(0x4090) | d.rd(0x4094) << 32
    assert gotc == 64 + 104 + 1518 + 104 + 104
    assert d.rd(0x40F4) == 1 and d.rd(0x40F0) == 1        # BPTC, MPTC
    assert d.rd(0x40D8) == 1 and d.rd(0x40EC) == 1        # PTC64, PTC1522
    assert d.rd(0x4074) == 2                              # GPRC
    assert d.rd(0x40D0) == 3                              # TPR: filtered ones too
    assert d.rd(0x4078) == 1                              # BPRC
    assert d.rd(0x4088) == 208 and d.rd(0x408C) == 0      # GORCL, GORCH
    assert d.rd(0x40C0) == 312                            # TORL
    for reg in (0x4080, 0x40D4, 0x4090, 0x4074, 0x40D0, 0x4078, 0x40C0):
        assert d.rd(reg) == 0, hex(reg)                   # cleared by the read
    d.wr(0x4080, 5)
    assert d.rd(0x4080) == 0                              # read-only


def test_sixty_four_bit_counters(nic):
    nic.dev.st[(0x4088 - 0x4000) >> 2] = (7 << 32) | 9
    assert nic.drv.rd(0x4088) == 9
    assert nic.drv.rd(0x408C) == 7
    assert nic.drv.rd(0x4088) == 0 and nic.drv.rd(0x408C) == 0
    nic.dev.st[(0x4074 - 0x4000) >> 2] = 1 << 40            # 32-bit ones stick at max
    assert nic.drv.rd(0x4074) == 0xFFFFFFFF


# -- resets, access widths -------------------------------------------------------------------
def test_reset_through_mmio_and_io_is_a_power_on(nic):
    d = nic.drv
    d.send(frame())
    nic.sent(1)
    d.wr(ITR, 100)
    d.wr(CTRL, d.rd(CTRL) | CTRL_RST)
    nic.vm.sync()
    assert d.rd(ITR) == 0 and d.rd(RCTL) == 0 and d.rd(TDT) == 0
    assert d.rd(0x5400) == int.from_bytes(MAC[:4], "little")   # RAR[0] from the EEPROM
    assert not nic.be.rx_on
    d.up()
    d.send(frame(size=77))
    assert nic.sent(2)[1] == frame(size=77)


def test_odd_access_widths(nic):
    d = nic.drv
    base = d.regs
    nic.vm.mmio.write(base + ITR, 2, 0x1234)
    assert nic.vm.mmio.read(base + ITR, 2) == 0x1234
    assert nic.vm.mmio.read(base + ITR + 1, 1) == 0x12
    nic.vm.mmio.write(base + 0x5200, 8, 0x1111111122222222)      # MTA[0], MTA[1]
    assert d.rd(0x5200) == 0x22222222 and d.rd(0x5204) == 0x11111111
    assert d.io_rd(ITR) == 0x1234
    d.io_wr(ITR, 7)
    assert d.rd(ITR) == 7


# -- guest errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["ring outside RAM", "tail out of range", "zero length",
                                  "buffer outside RAM", "oversized"])
def test_bad_transmit_rings_stop_the_nic(nic, case, caplog):
    d = nic.drv
    if case == "ring outside RAM":
        d.wr(0x3800, 0xF0000000)
        d.wr(TDT, 1)
    elif case == "tail out of range":
        d.wr(TDT, 64)
    elif case == "zero length":
        d._tx_desc(0x1000, 0 | 0x0B << 24, 0)
        d.kick()
    elif case == "buffer outside RAM":
        d._tx_desc(0xE0000000, 100 | 0x0B << 24, 0)
        d.kick()
    else:
        for _ in range(5):
            d._tx_desc(0x1000, 4000 | 0x00 << 24, 0)  # no EOP: one packet of 20000 bytes
        d.kick()
    with caplog.at_level(logging.ERROR, "vmrun.e1000"):
        wait(lambda: nic.dev.broken)
        nic.vm.sync()
    assert len([r for r in caplog.records if "DMA stopped" in r.message]) == 1
    assert not nic.vm.loop.faults                         # nothing escaped to the guard
    d.send(frame())                                       # stopped until a reset...
    time.sleep(0.05)
    assert not nic.be.sent
    d.reset()                                             # ...which recovers it
    d.up()
    d.send(frame())
    assert nic.sent(1) == [frame()]


@pytest.mark.parametrize("case", ["ring outside RAM", "buffer outside RAM", "head out of range"])
def test_bad_receive_rings_stop_the_nic(nic, case, caplog):
    d = nic.drv
    if case == "ring outside RAM":
        d.wr(0x2800, 0xF0000000)
    elif case == "buffer outside RAM":
        nic.vm.memory.write(d.rx_ring, struct.pack("<Q", 0xE0000000))
    else:
        d.wr(RDH, 500)
    with caplog.at_level(logging.ERROR, "vmrun.e1000"):
        nic.be.inject(to_us())
        d.wr(RDT, 10)
        wait(lambda: nic.dev.broken)
    assert not nic.be.rx_on and not nic.vm.loop.faults
    d.reset()
    d.up()
    nic.be.inject(to_us(fill=b"k"))
    got = d.receive(1)                   # the frame from before the fault may come first
    if got[-1][0] != to_us(fill=b"k"):
        got += d.receive(1)
    assert got[-1][0] == to_us(fill=b"k")


def test_bus_mastering_off_pauses_without_breaking(nic):
    pci = PciDriver(nic.vm)
    cmd = pci.read(SLOT, 0, 0x04, 2)
    pci.write(SLOT, 0, 0x04, 2, cmd & ~4)
    nic.drv.send(frame())
    time.sleep(0.05)
    assert not nic.be.sent and not nic.dev.broken
    pci.write(SLOT, 0, 0x04, 2, cmd)
    assert nic.sent(1) == [frame()]


def test_offload_checksum_reference():
    import os

    for n in (0, 1, 2, 3, 20, 1499, 1500):
        data = os.urandom(n)
        assert ~ones_sum(data) & 0xFFFF == inet_checksum(data) or (n == 0)
    assert ones_sum(bytes(10)) == 0
    assert ones_sum(b"\xff\xff") == 0xFFFF


def test_registered_as_e1000_and_e82545():
    from vmrun.plugins import build_registry

    reg = build_registry()
    for name in ("e1000", "e82545"):
        dt = reg.get(name)
        assert dt is not None and dt.plugin == "vmrun-e1000"
        assert {o.name for o in dt.options} >= {"backend", "mac", "forward", "capture"}


# -- snapshots -------------------------------------------------------------------------------
def _moved(nic: Nic) -> Nic:
    """A fresh E1000 on a copy of ``nic``'s RAM with the state ``nic`` saved (through JSON);
    ``nic``'s driver goes on with it, unaware of the move."""
    import json

    state = json.loads(json.dumps(nic.vm.pci.save_state()))
    new = Nic(memory=nic.vm.memory.size, up=False)
    new.vm.memory.write(0, nic.vm.memory.read(0, nic.vm.memory.size))
    new.vm.pci.load_state(state)
    d = nic.drv
    d.vm, d.mem, d.pci = new.vm, new.vm.memory, PciDriver(new.vm)
    new.drv = d
    new.vm.sync()
    return new


def test_snapshot_carries_a_half_sent_packet_contexts_held_frames_and_counters():
    """Mid-operation: a checksum context loaded, a packet whose EOP descriptor the driver
    has not posted yet, a received frame held for want of buffers, counters not read yet,
    a PHY register and the interrupt mask. A fresh device with the saved state finishes and
    sends the packet, applies the old context to a new packet, delivers the held frame, and
    reads back the same registers."""
    nic = Nic(bufsize=1024)
    d = nic.drv
    udp = ip_packet(MAC, PEER, 17, udp_header() + b"u" * 50, seed=True)
    csum = Offload(ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=40, tcp=False)
    d.send(udp, offload=csum, ip_csum=True, l4_csum=True)
    nic.sent(1)
    d.phy_write(4, 0x0de1)                                # autoneg advertisement
    for i in range(62):                                   # 63 buffers posted, 62 used
        nic.be.inject(to_us(100 + i))
    held = to_us(1500, fill=b"H")                         # needs two: held
    nic.be.inject(held)
    wait(lambda: len(nic.dev._rx_held) == 1)
    assert d.rd(RDH) == 62
    big = frame(size=300, fill=b"h")
    eop = d.send(big, split=[100, 100], kick=False)       # three descriptors
    d.wr(TDT, (d.tx_next - 1) % d.tx_count)               # the EOP one not yet posted
    nic.vm.sync()
    assert nic.dev._pkt_len == 200
    ims = d.rd(IMS)
    new = _moved(nic)
    nic.close()
    try:
        assert new.drv.rd(IMS) == ims and new.drv.phy_read(4) == 0x0de1
        d.kick()                                          # post the EOP descriptor
        d.wait_tx(eop)
        assert new.sent(1) == [big]
        # A DEXT data descriptor without a new context: the saved checksum context.
        a, n = d._buffers(udp, None)[0]
        d._tx_desc(a, n | 1 << 20 | (0x20 | 0x0B) << 24, 0x3 << 8)
        d.kick()
        got = new.sent(2)[1]
        assert checksums_ok(got) and len(got) == len(udp)
        got = d.receive(63)
        assert [len(g[0]) for g in got] == [100 + i for i in range(62)] + [1500]
        assert got[-1][0] == held
        assert d.rd(0x4074) == 63                         # GPRC: counted on both sides
    finally:
        new.close()


def test_snapshot_carries_a_packet_the_full_backend_did_not_take(nic):
    """The packet stays the device's (its descriptor without DD) until the backend of the
    restored device takes it; then DD and the transmit interrupt, as without the move."""
    nic.be.set_full(True)
    idx = nic.drv.send(frame(size=90, fill=b"f"))
    nic.vm.sync()
    assert len(nic.dev._tx_pending) == 1 and not nic.drv.tx_done(idx)
    nic.drv.icr()
    new = _moved(nic)
    try:
        nic.drv.wait_tx(idx)
        assert new.sent(1) == [frame(size=90, fill=b"f")]
        wait(lambda: new.drv.irq)
        assert new.drv.icr() & ICR_TXDW
    finally:
        new.close()


def test_snapshot_rearms_the_receive_delay_timer():
    """A frame stored while the receive delay timer ran: the restored device raises RXT0
    when its re-armed timer fires (not never, not at once)."""
    n = Nic(rdtr=50000, radv=0)                          # ~50 ms packet timer
    d = n.drv
    d.icr()
    n.be.inject(to_us())
    wait(lambda: d.rd(RDH) == 1)
    assert n.dev.rx_delay_armed and not d.irq
    new = _moved(n)
    n.close()
    try:
        assert not d.irq
        wait(lambda: d.irq)
        assert d.icr() & ICR_RXT0
    finally:
        new.close()


def test_a_state_of_another_version_is_refused(nic):
    state = nic.dev.device_state()
    state["version"] = 2
    with pytest.raises(ValueError, match="e1000: state version 2, this vmrun has 1"):
        nic.dev.load_device_state(state)
