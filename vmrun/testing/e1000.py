"""A mock e1000 driver: an Intel 8254x function on a :class:`~vmrun.testing.FakeVm` driven as
Linux's ``e1000`` driver drives it.

It resets the MAC through the I/O BAR (IOADDR/IODATA, as Linux does for the 82545), reads
the EEPROM bit by bit through EECD (Microwire) or a word at a time through EERD, talks to the
PHY through MDIC, lays out legacy transmit and receive rings in fake guest memory, and sends
packets with legacy descriptors or with a context descriptor (checksum offload, TSO) and
extended data descriptors, split over as many buffers as asked. It knows nothing of the
device model: only registers and memory, as a real driver (its constants are its own).

    drv = E1000Driver(vm, slot)
    drv.reset(); drv.up()                       # rings, RCTL/TCTL, IMS, as e1000_open
    drv.send(frame); drv.wait_tx()
    frames = drv.receive()                      # [(bytes, status, errors, special)]
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from vmrun.testing.pcidriver import PciDriver
from vmrun.testing.virtio import Allocator

# Registers (8254x SDM chapter 13).
CTRL, STATUS, EECD, EERD, MDIC = 0x0000, 0x0008, 0x0010, 0x0014, 0x0020
ICR, ITR, ICS, IMS, IMC = 0x00C0, 0x00C4, 0x00C8, 0x00D0, 0x00D8
RCTL, TCTL, TIPG, VET = 0x0100, 0x0400, 0x0410, 0x0038
RDBAL, RDBAH, RDLEN, RDH, RDT, RDTR, RADV = (0x2800, 0x2804, 0x2808, 0x2810, 0x2818,
                                             0x2820, 0x282C)
TDBAL, TDBAH, TDLEN, TDH, TDT, TIDV, TADV = (0x3800, 0x3804, 0x3808, 0x3810, 0x3818,
                                             0x3820, 0x382C)
RXCSUM, MTA, RA, VFTA = 0x5000, 0x5200, 0x5400, 0x5600
CTRL_SLU, CTRL_RST, CTRL_VME, CTRL_PHY_RST = 1 << 6, 1 << 26, 1 << 30, 1 << 31
STATUS_LU = 1 << 1
EECD_SK, EECD_CS, EECD_DI, EECD_DO, EECD_REQ, EECD_GNT = 1, 2, 4, 8, 0x40, 0x80
RCTL_EN, RCTL_UPE, RCTL_MPE, RCTL_LPE, RCTL_BAM = 1 << 1, 1 << 3, 1 << 4, 1 << 5, 1 << 15
RCTL_VFE, RCTL_BSEX, RCTL_SECRC = 1 << 18, 1 << 25, 1 << 26
TCTL_EN, TCTL_PSP = 1 << 1, 1 << 3
ICR_TXDW, ICR_TXQE, ICR_LSC, ICR_RXSEQ, ICR_RXDMT0, ICR_RXT0 = 1, 2, 4, 8, 0x10, 0x80
IMS_LINUX = ICR_RXT0 | ICR_TXDW | ICR_RXDMT0 | ICR_RXSEQ | ICR_LSC   # IMS_ENABLE_MASK
MDIC_READ, MDIC_WRITE, MDIC_READY, MDIC_ERROR = 2 << 26, 1 << 26, 1 << 28, 1 << 30
# Descriptor bits.
TXD_EOP, TXD_IFCS, TXD_IC, TXD_RS, TXD_DEXT, TXD_VLE, TXD_IDE = (1, 2, 4, 8, 0x20, 0x40,
                                                                 0x80)
TXD_TSE = 0x04
TXD_DD = 1
DTYP_C, DTYP_D = 0, 1
TUCMD_TCP, TUCMD_IP, TUCMD_TSE = 1, 2, 4
POPTS_IXSM, POPTS_TXSM = 1, 2
RXD_DD, RXD_EOP, RXD_IXSM, RXD_VP, RXD_TCPCS, RXD_IPCS = 1, 2, 4, 8, 0x20, 0x40
RXD_ERR_TCPE, RXD_ERR_IPE = 0x20, 0x40
BSIZE_CODES = {2048: (0, 0), 1024: (1, 0), 512: (2, 0), 256: (3, 0), 16384: (1, 1),
               8192: (2, 1), 4096: (3, 1)}


@dataclass
class Offload:
    """What a context descriptor says (offsets into the packet as the driver laid it out)."""

    ipcss: int = 0
    ipcso: int = 0
    ipcse: int = 0
    tucss: int = 0
    tucso: int = 0
    tucse: int = 0
    tcp: bool = True
    ipv4: bool = True
    tso: bool = False
    mss: int = 0
    hdr_len: int = 0


class E1000Driver:
    def __init__(self, vm, slot: int, mem_start: int = 0x200000,
                 mem_end: int | None = None) -> None:
        self.vm = vm
        self.mem = vm.memory
        self.slot = slot
        pci = PciDriver(vm)
        self.pci = pci
        self.regs = pci.bar_address(slot, 0, 0)
        self.io = pci.bar_address(slot, 0, 1)
        self.alloc = Allocator(mem_start, mem_end or min(vm.memory.size, 0x8000000))
        self.tx_count = self.rx_count = 0
        self.tx_ring = self.rx_ring = 0
        self.tx_next = 0          # next descriptor to fill
        self.tx_clean = 0         # next descriptor to reap
        self.rx_next = 0          # next descriptor to look at
        self.rx_bufs: list[int] = []
        self.bufsize = 2048

    # -- registers ------------------------------------------------------------------------
    def rd(self, off: int) -> int:
        return self.vm.mmio.read(self.regs + off, 4)

    def wr(self, off: int, value: int) -> None:
        self.vm.mmio.write(self.regs + off, 4, value & 0xFFFFFFFF)

    def io_wr(self, off: int, value: int) -> None:
        self.vm.pio.write(self.io, 4, off)
        self.vm.pio.write(self.io + 4, 4, value)

    def io_rd(self, off: int) -> int:
        self.vm.pio.write(self.io, 4, off)
        return self.vm.pio.read(self.io + 4, 4)

    @property
    def irq(self) -> bool:
        dev = self.vm.pci.devices[(self.slot, 0)]
        return bool(dev.intx.level)

    # -- reset, EEPROM, PHY (e1000_hw.c) ----------------------------------------------------
    def reset(self) -> None:
        """e1000_reset_hw: interrupts off, receive and transmit off, then CTRL.RST through
        the I/O BAR (the 82545 cannot take the 64-bit write)."""
        self.wr(IMC, 0xFFFFFFFF)
        self.wr(RCTL, 0)
        self.wr(TCTL, TCTL_PSP)
        self.rd(STATUS)
        self.io_wr(CTRL, self.rd(CTRL) | CTRL_RST)
        self.wr(IMC, 0xFFFFFFFF)
        self.rd(ICR)
        self.vm.sync()

    def _eecd(self, value: int) -> None:
        self.wr(EECD, value)

    def eeprom_read(self, offset: int, words: int = 1) -> list[int]:
        """e1000_read_eeprom for a Microwire part: per word, opcode 110 and a 6-bit address
        shifted out on DI, 16 bits shifted in from DO, standby between words."""
        eecd = self.rd(EECD) | EECD_REQ
        self._eecd(eecd)
        for _ in range(100):
            if self.rd(EECD) & EECD_GNT:
                break
        else:
            raise AssertionError("EEPROM grant never came")
        eecd &= ~(EECD_DI | EECD_SK)
        self._eecd(eecd)
        eecd |= EECD_CS
        self._eecd(eecd)
        out = []
        for i in range(words):
            eecd = self._shift_out(eecd, 0b110, 3)
            eecd = self._shift_out(eecd, offset + i, 6)
            word, eecd = self._shift_in(eecd)
            out.append(word)
            # standby: CS low, clock high, CS high, clock low
            eecd &= ~(EECD_CS | EECD_SK)
            self._eecd(eecd)
            eecd |= EECD_SK
            self._eecd(eecd)
            eecd |= EECD_CS
            self._eecd(eecd)
            eecd &= ~EECD_SK
            self._eecd(eecd)
        eecd &= ~(EECD_CS | EECD_DI)
        self._eecd(eecd)
        self._eecd(eecd | EECD_SK)
        self._eecd(eecd)
        self._eecd(eecd & ~EECD_REQ)
        return out

    def _shift_out(self, eecd: int, data: int, count: int) -> int:
        eecd &= ~EECD_DO
        for bit in range(count - 1, -1, -1):
            eecd = eecd | EECD_DI if data >> bit & 1 else eecd & ~EECD_DI
            self._eecd(eecd)
            self._eecd(eecd | EECD_SK)
            self._eecd(eecd)
        eecd &= ~EECD_DI
        self._eecd(eecd)
        return eecd

    def _shift_in(self, eecd: int) -> tuple[int, int]:
        eecd &= ~(EECD_DO | EECD_DI)
        data = 0
        for _ in range(16):
            data <<= 1
            self._eecd(eecd | EECD_SK)
            if self.rd(EECD) & EECD_DO:
                data |= 1
            self._eecd(eecd)
        return data, eecd

    def eeprom_read_eerd(self, offset: int) -> int:
        """One word through EERD (82545 layout: START bit 0, DONE bit 4, address 15:8)."""
        self.wr(EERD, offset << 8 | 1)
        for _ in range(100):
            v = self.rd(EERD)
            if v & 0x10:
                return v >> 16
        raise AssertionError("EERD never said done")

    def phy_read(self, reg: int, phy: int = 1) -> int:
        self.wr(MDIC, reg << 16 | phy << 21 | MDIC_READ)
        for _ in range(64):
            v = self.rd(MDIC)
            if v & MDIC_READY:
                if v & MDIC_ERROR:
                    raise OSError(f"MDIC read of PHY {phy} register {reg}: error")
                return v & 0xFFFF
        raise AssertionError("MDIC never ready")

    def phy_write(self, reg: int, value: int, phy: int = 1) -> None:
        self.wr(MDIC, value | reg << 16 | phy << 21 | MDIC_WRITE)
        for _ in range(64):
            v = self.rd(MDIC)
            if v & MDIC_READY:
                if v & MDIC_ERROR:
                    raise OSError(f"MDIC write of PHY {phy} register {reg}: error")
                return
        raise AssertionError("MDIC never ready")

    def mac_address(self) -> bytes:
        words = self.eeprom_read(0, 3)
        return b"".join(w.to_bytes(2, "little") for w in words)

    # -- bring-up (e1000_configure_tx / _rx, e1000_irq_enable) ----------------------------------
    def up(self, tx_count: int = 64, rx_count: int = 64, bufsize: int = 2048,
           rctl: int = RCTL_BAM, ims: int = IMS_LINUX, itr: int = 0, rdtr: int = 0,
           radv: int = 0, tidv: int = 0, tadv: int = 0, mac: bytes | None = None) -> None:
        if mac is not None:
            self.set_rar(0, mac)
        self.tx_count, self.rx_count, self.bufsize = tx_count, rx_count, bufsize
        self.tx_ring = self.alloc.alloc(16 * tx_count, 128)
        self.mem.fill(self.tx_ring, 16 * tx_count)
        self.wr(TDLEN, 16 * tx_count)
        self.wr(TDBAH, self.tx_ring >> 32)
        self.wr(TDBAL, self.tx_ring)
        self.wr(TDT, 0)
        self.wr(TDH, 0)
        self.tx_next = self.tx_clean = 0
        self.wr(TIDV, tidv)
        self.wr(TADV, tadv)
        self.wr(TCTL, TCTL_EN | TCTL_PSP | 0x0F << 4 | 0x40 << 12)
        self.wr(RCTL, 0)
        self.wr(RDTR, rdtr)
        self.wr(RADV, radv)
        self.wr(ITR, itr)
        self.rx_ring = self.alloc.alloc(16 * rx_count, 128)
        self.mem.fill(self.rx_ring, 16 * rx_count)
        self.wr(RDLEN, 16 * rx_count)
        self.wr(RDBAH, self.rx_ring >> 32)
        self.wr(RDBAL, self.rx_ring)
        self.wr(RDT, 0)
        self.wr(RDH, 0)
        self.rx_bufs = [self.alloc.alloc(bufsize, 16) for _ in range(rx_count)]
        for i, b in enumerate(self.rx_bufs):
            self.mem.write(self.rx_ring + 16 * i, struct.pack("<QQ", b, 0))
        self.rx_next = 0
        code, bsex = BSIZE_CODES[bufsize]
        self.wr(RCTL, rctl | RCTL_EN | code << 16 | (RCTL_BSEX if bsex else 0))
        self.wr(RDT, rx_count - 1)          # Linux keeps one descriptor back
        self.wr(IMS, ims)
        self.vm.sync()

    def set_rar(self, index: int, mac: bytes, valid: bool = True) -> None:
        self.wr(RA + 8 * index, int.from_bytes(mac[:4], "little"))
        self.wr(RA + 8 * index + 4, int.from_bytes(mac[4:], "little") | (1 << 31 if valid else 0))

    def set_mta(self, mac: bytes, mo: int = 0) -> None:
        shift = (4, 3, 2, 0)[mo]
        h = (mac[4] >> shift | mac[5] << (8 - shift)) & 0xFFF
        word = MTA + 4 * (h >> 5)
        self.wr(word, self.rd(word) | 1 << (h & 31))

    # -- transmit -------------------------------------------------------------------------
    def _tx_desc(self, addr: int, lower: int, upper: int) -> int:
        i = self.tx_next
        self.mem.write(self.tx_ring + 16 * i, struct.pack("<QII", addr, lower, upper))
        self.tx_next = (i + 1) % self.tx_count
        return i

    def _buffers(self, data: bytes, split: list[int] | None) -> list[tuple[int, int]]:
        sizes = list(split or [len(data)])
        if sum(sizes) != len(data):
            sizes.append(len(data) - sum(sizes))
        out, pos = [], 0
        for n in sizes:
            if n <= 0:
                continue
            a = self.alloc.alloc(n, 2)
            self.mem.write(a, data[pos:pos + n])
            out.append((a, n))
            pos += n
        return out

    def send(self, frame: bytes, split: list[int] | None = None, offload: Offload | None = None,
             ip_csum: bool = False, l4_csum: bool = False, vlan: int | None = None,
             ide: bool = False, legacy_csum: tuple[int, int] | None = None,
             kick: bool = True) -> int:
        """Queue one packet (in ``split`` pieces); returns the EOP descriptor's index.

        ``offload``: a context descriptor first (checksum offsets, TSO), then extended data
        descriptors with POPTS ``ip_csum``/``l4_csum``; else legacy descriptors, with
        ``legacy_csum`` = (CSS, CSO) for the legacy checksum insertion (IC)."""
        bufs = self._buffers(frame, split)
        ext = offload is not None
        if ext:
            o = offload
            tucmd = (TUCMD_TCP if o.tcp else 0) | (TUCMD_IP if o.ipv4 else 0) | \
                (TUCMD_TSE if o.tso else 0)
            paylen = max(0, len(frame) - o.hdr_len) & 0xFFFFF if o.tso else 0
            addr = o.ipcss | o.ipcso << 8 | o.ipcse << 16 | o.tucss << 32 | o.tucso << 40 | \
                o.tucse << 48
            self._tx_desc(addr, paylen | DTYP_C << 20 | (tucmd | TXD_DEXT) << 24,
                          o.hdr_len << 8 | o.mss << 16)
        popts = (POPTS_IXSM if ip_csum else 0) | (POPTS_TXSM if l4_csum else 0)
        last = 0
        for k, (a, n) in enumerate(bufs):
            eop = k == len(bufs) - 1
            cmd = TXD_IFCS | (TXD_EOP | TXD_RS if eop else 0) | (TXD_IDE if ide else 0)
            if vlan is not None and eop:
                cmd |= TXD_VLE
            if ext:
                cmd |= TXD_DEXT | (TXD_TSE if offload.tso else 0)
                lower = n | DTYP_D << 20 | cmd << 24
                upper = popts << 8 | ((vlan or 0) << 16 if eop else 0)
            else:
                css, cso = legacy_csum or (0, 0)
                if legacy_csum is not None and eop:
                    cmd |= TXD_IC
                lower = n | (cso if eop else 0) << 16 | cmd << 24
                upper = (css if eop else 0) << 8 | ((vlan or 0) << 16 if eop else 0)
            last = self._tx_desc(a, lower, upper)
        if kick:
            self.kick()
        return last

    def kick(self) -> None:
        self.wr(TDT, self.tx_next)

    def tx_done(self, index: int) -> bool:
        return bool(self.mem.read(self.tx_ring + 16 * index + 12, 1)[0] & TXD_DD)

    def wait_tx(self, index: int | None = None, timeout: float = 5.0) -> None:
        """Wait for DD on descriptor ``index`` (default: the last one queued)."""
        if index is None:
            index = (self.tx_next - 1) % self.tx_count
        end = time.monotonic() + timeout
        while not self.tx_done(index):
            if time.monotonic() > end:
                raise TimeoutError(f"transmit descriptor {index} never done")
            time.sleep(0.001)

    # -- receive --------------------------------------------------------------------------
    def receive(self, want: int = 1, timeout: float = 5.0,
                refill: bool = True) -> list[tuple[bytes, int, int, int]]:
        """Frames the device stored (EOP-joined, FCS stripped unless SECRC): (data, status,
        errors, special) each; waits until ``want`` are there (0: just what is there)."""
        out: list[tuple[bytes, int, int, int]] = []
        end = time.monotonic() + timeout
        parts = b""
        strip = 0 if self.rd(RCTL) & RCTL_SECRC else 4
        while True:
            i = self.rx_next
            desc = self.mem.read(self.rx_ring + 16 * i, 16)
            addr, length, _csum, status, errors, special = struct.unpack("<QHHBBH", desc)
            if not status & RXD_DD:
                if len(out) >= want:
                    break
                if time.monotonic() > end:
                    break
                time.sleep(0.001)
                continue
            parts += self.mem.read(addr, length)
            self.mem.write(self.rx_ring + 16 * i + 8, bytes(8))
            self.rx_next = (i + 1) % self.rx_count
            if refill:
                self.wr(RDT, i)
            if status & RXD_EOP:
                out.append((parts[:len(parts) - strip], status, errors, special))
                parts = b""
        return out

    def icr(self) -> int:
        return self.rd(ICR)


# -- packets for the tests: built and checked without the device's own code ------------------
def inet_checksum(data: bytes) -> int:
    """RFC 1071, the slow obvious way (a reference for the device's fast one)."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack(">BBH", 0, proto, length)
    return src + dst + struct.pack(">IxxxB", length, proto)


def ip_packet(src_mac: bytes, dst_mac: bytes, proto: int, l4: bytes, *, v6: bool = False,
              src_ip: bytes | None = None, dst_ip: bytes | None = None, ident: int = 0x1234,
              ip_csum: bool = True, l4_csum: bool = True, seed: bool = False,
              seed_len: bool = True) -> bytes:
    """An Ethernet + IPv4/IPv6 + TCP/UDP packet. With ``seed`` the TCP/UDP checksum field
    holds the pseudo-header sum as a driver leaves it for offload (with or without the
    length: ``seed_len``), and the IPv4 checksum is 0; else both checksums are complete
    (``ip_csum``/``l4_csum`` False leave them 0)."""
    src_ip = src_ip or (bytes(range(0x20, 0x30)) if v6 else bytes([10, 0, 0, 1]))
    dst_ip = dst_ip or (bytes(range(0x40, 0x50)) if v6 else bytes([10, 0, 0, 2]))
    cso = 16 if proto == 6 else 6
    l4 = bytearray(l4)
    if proto == 17:
        struct.pack_into(">H", l4, 4, len(l4))
    struct.pack_into(">H", l4, cso, 0)
    if seed:
        p = _pseudo(src_ip, dst_ip, proto, len(l4) if seed_len else 0)
        struct.pack_into(">H", l4, cso, ~inet_checksum(p) & 0xFFFF)
    elif l4_csum:
        c = inet_checksum(_pseudo(src_ip, dst_ip, proto, len(l4)) + bytes(l4))
        struct.pack_into(">H", l4, cso, c or (0xFFFF if proto == 17 else 0))
    if v6:
        ip = struct.pack(">IHBB", 6 << 28, len(l4), proto, 64) + src_ip + dst_ip
        ethertype = 0x86DD
    else:
        ip = bytearray(struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(l4), ident, 0x4000, 64,
                                   proto, 0) + src_ip + dst_ip)
        if ip_csum and not seed:
            struct.pack_into(">H", ip, 10, inet_checksum(bytes(ip)))
        ethertype = 0x0800
    return dst_mac + src_mac + struct.pack(">H", ethertype) + bytes(ip) + bytes(l4)


def tcp_header(seq: int = 1000, ack: int = 0, flags: int = 0x18, sport: int = 40000,
               dport: int = 80, window: int = 65535) -> bytes:
    return struct.pack(">HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)


def udp_header(sport: int = 5353, dport: int = 53) -> bytes:
    return struct.pack(">HHHH", sport, dport, 8, 0)


def checksums_ok(frame: bytes) -> bool:
    """Whether an Ethernet/IPv4-or-IPv6/TCP-or-UDP frame's checksums are all right."""
    l3 = 14
    ethertype = struct.unpack_from(">H", frame, 12)[0]
    if ethertype == 0x8100:
        l3 = 18
        ethertype = struct.unpack_from(">H", frame, 16)[0]
    if ethertype == 0x0800:
        ihl = (frame[l3] & 0xF) * 4
        total = struct.unpack_from(">H", frame, l3 + 2)[0]
        if inet_checksum(frame[l3:l3 + ihl]) != 0:
            return False
        proto, src, dst = frame[l3 + 9], frame[l3 + 12:l3 + 16], frame[l3 + 16:l3 + 20]
        l4 = frame[l3 + ihl:l3 + total]
    else:
        plen = struct.unpack_from(">H", frame, l3 + 4)[0]
        proto, src, dst = frame[l3 + 6], frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40]
        l4 = frame[l3 + 40:l3 + 40 + plen]
    if proto == 17 and l4[6:8] == b"\0\0":
        return True
    return inet_checksum(_pseudo(src, dst, proto, len(l4)) + l4) == 0
