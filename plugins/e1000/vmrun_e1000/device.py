"""The 82545EM MAC: registers, descriptor rings, offloads, filters, interrupts, statistics.

Threads: ``bar_read``/``bar_write`` run on vCPU threads and only touch registers (a lock,
``self.lock``, covers the interrupt state, the PHY and the counters); the rings are served on
the event loop (``_tx_run`` from a TDT write, ``_rx_run`` when the backend has frames or the
driver posts buffers), under ``self.work``, which a device reset also takes so it never
lands in the middle of a packet.

Everything in guest memory is guest input: a ring outside RAM, a head or tail outside the
ring, a buffer outside RAM, a zero-length or oversized transmit buffer stop the NIC's DMA
with one log line (:meth:`fault`) until the driver resets it (CTRL.RST) or the machine
resets; a context whose offsets do not fit its packet only drops that packet (counted).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import astuple
from typing import Any

from vmrun.api import (
    BAR_IO,
    BAR_MEM32,
    CAP_CSUM,
    CAP_TSO4,
    CAP_TSO6,
    CAP_VNET_HDR,
    COMMAND,
    VNET_HDR_LEN,
    BarSpec,
    GuestError,
    LinkCallbacks,
    NetBackend,
    PciDevice,
    check_version,
    load_fields,
    plain_fields,
    versioned,
)
from vmrun_e1000 import eeprom
from vmrun_e1000.offload import (
    Context,
    OffloadError,
    checksum,
    complete_partial,
    insert_checksum,
    rx_checksum,
    segment,
    tso_as_gso,
)
from vmrun_e1000.phy import Phy
from vmrun_e1000.regs import (
    BPRC,
    BPTC,
    CTRL,
    CTRL_PHY_RST,
    CTRL_RST,
    CTRL_SLU,
    CTRL_SPD_1000,
    CTRL_VME,
    DESC_SIZE,
    EECD,
    EERD,
    EERD_ADDR_SHIFT,
    EERD_DATA_SHIFT,
    EERD_DONE,
    EERD_START,
    GORCL,
    GOTCL,
    GPRC,
    GPTC,
    ICR,
    ICR_LSC,
    ICR_MASK,
    ICR_MDAC,
    ICR_RXDMT0,
    ICR_RXT0,
    ICR_TXDW,
    ICR_TXQE,
    ICS,
    IMC,
    IMS,
    IO_SIZE,
    IOADDR,
    IODATA,
    ITR,
    LEDCTL,
    MANC,
    MDIC,
    MDIC_DATA,
    MDIC_ERROR,
    MDIC_INT_EN,
    MDIC_OP_READ,
    MDIC_OP_SHIFT,
    MDIC_OP_WRITE,
    MDIC_PHY_SHIFT,
    MDIC_READY,
    MDIC_REG_SHIFT,
    MMIO_SIZE,
    MPC,
    MPRC,
    MPTC,
    MTA,
    PBA,
    PHY_ADDR,
    POPTS_IXSM,
    POPTS_TXSM,
    PRC64,
    PTC64,
    RA,
    RA_ENTRIES,
    RADV,
    RAH_AV,
    RCTL,
    RCTL_BAM,
    RCTL_BSEX,
    RCTL_BSIZE_SHIFT,
    RCTL_EN,
    RCTL_LPE,
    RCTL_MO_SHIFT,
    RCTL_MPE,
    RCTL_RDMTS_SHIFT,
    RCTL_SECRC,
    RCTL_UPE,
    RCTL_VFE,
    RDBAH,
    RDBAL,
    RDH,
    RDLEN,
    RDT,
    RDTR,
    RDTR_FPD,
    RNBC,
    ROC,
    RUC,
    RXCSUM,
    RXCSUM_IPOFL,
    RXCSUM_TUOFL,
    RXD_STAT_DD,
    RXD_STAT_EOP,
    RXD_STAT_IPCS,
    RXD_STAT_IXSM,
    RXD_STAT_TCPCS,
    RXD_STAT_VP,
    STATS64,
    STATS_END,
    STATS_START,
    STATUS,
    STATUS_ASDV_1000,
    STATUS_FD,
    STATUS_LU,
    STATUS_SPEED_1000,
    TADV,
    TCTL,
    TCTL_EN,
    TDBAH,
    TDBAL,
    TDH,
    TDLEN,
    TDT,
    TIDV,
    TORL,
    TOTL,
    TPR,
    TPT,
    TSCTC,
    TSCTFC,
    TUCMD_TSE,
    TXD_CMD_DEXT,
    TXD_CMD_EOP,
    TXD_CMD_IC,
    TXD_CMD_IDE,
    TXD_CMD_RS,
    TXD_CMD_TSE,
    TXD_CMD_VLE,
    TXD_DTYP_C,
    TXD_DTYP_D,
    TXD_STAT_DD,
    VET,
    VFTA,
)

log = logging.getLogger("vmrun.e1000")
_release_gil = time.sleep

#: The largest packet without TSE (the 82545EM's 16 KiB jumbo frames, plus a VLAN tag).
MAX_FRAME = 16384 + 4
#: The largest TSE packet gathered (header and payload; Linux sends up to 64 KiB).
MAX_TSO = 256 * 1024
#: Frames received at most per event-loop call, descriptors transmitted at most per call.
RX_BUDGET = 256
TX_BUDGET = 1024
TX_BATCH = 32                # frames handed to the backend at once
RX_SCRATCH = 65536 + VNET_HDR_LEN + 64
BROADCAST = b"\xff" * 6
USEC = 1.024e-6              # the delay timers' unit
MIN_FRAME = 60               # without FCS

_VNET = struct.Struct("<BBHHHHH")
VNET_NONE = bytes(VNET_HDR_LEN)
VNET_F_NEEDS_CSUM, VNET_F_DATA_VALID = 1, 2
GSO_TCPV4, GSO_TCPV6 = 1, 4
_DESC = struct.Struct("<QII")
_RXWB = struct.Struct("<HHBBH")
_Q = struct.Struct("<Q")

_BSIZES = (2048, 1024, 512, 256)
_BSIZES_EXT = (0, 16384, 8192, 4096)
_MO_SHIFT = (4, 3, 2, 0)


# Register indexes (dword offsets) used on hot paths.
I_CTRL = CTRL >> 2
I_EECD = EECD >> 2
I_EERD = EERD >> 2
I_ICR = ICR >> 2
I_ICS = ICS >> 2
I_IMC = IMC >> 2
I_IMS = IMS >> 2
I_ITR = ITR >> 2
I_LEDCTL = LEDCTL >> 2
I_MANC = MANC >> 2
I_MDIC = MDIC >> 2
I_MTA = MTA >> 2
I_PBA = PBA >> 2
I_RA = RA >> 2
I_RADV = RADV >> 2
I_RCTL = RCTL >> 2
I_RDBAH = RDBAH >> 2
I_RDBAL = RDBAL >> 2
I_RDH = RDH >> 2
I_RDLEN = RDLEN >> 2
I_RDT = RDT >> 2
I_RDTR = RDTR >> 2
I_RXCSUM = RXCSUM >> 2
I_STATUS = STATUS >> 2
I_TADV = TADV >> 2
I_TCTL = TCTL >> 2
I_TDBAH = TDBAH >> 2
I_TDBAL = TDBAL >> 2
I_TDH = TDH >> 2
I_TDLEN = TDLEN >> 2
I_TDT = TDT >> 2
I_TIDV = TIDV >> 2
I_VET = VET >> 2
I_VFTA = VFTA >> 2


def _stat(off: int) -> int:
    return (off - STATS_START) >> 2


S_GPRC, S_GPTC, S_GORC, S_GOTC, S_TOR, S_TOT = map(_stat, (GPRC, GPTC, GORCL, GOTCL, TORL,
                                                         TOTL))
S_TPR, S_TPT, S_PRC64, S_PTC64 = map(_stat, (TPR, TPT, PRC64, PTC64))
S_BPRC, S_MPRC, S_BPTC, S_MPTC = map(_stat, (BPRC, MPRC, BPTC, MPTC))
S_MPC, S_RNBC, S_ROC, S_RUC, S_TSCTC, S_TSCTFC = map(_stat, (MPC, RNBC, ROC, RUC, TSCTC,
                                                           TSCTFC))


class E1000(PciDevice):
    vendor_id, device_id = 0x8086, 0x100F
    class_code = 0x020000            # Ethernet controller
    revision = 0
    subsystem_vendor_id, subsystem_id = 0x8086, 0x1001
    interrupt_pin = 1                # INTA#: what Linux's e1000 and Windows use
    bars = [BarSpec(0, MMIO_SIZE, BAR_MEM32), BarSpec(1, IO_SIZE, BAR_IO)]
    name = "e1000"

    def __init__(self, backend: NetBackend, mac: bytes, name: str = "e1000") -> None:
        self.name = name
        self.backend = backend
        self.mac_address = bytes(mac)
        self.vnet = CAP_VNET_HDR in backend.caps
        self.gso_caps = {GSO_TCPV4: self.vnet and CAP_TSO4 in backend.caps,
                         GSO_TCPV6: self.vnet and CAP_TSO6 in backend.caps}
        self.csum_passthrough = self.vnet and CAP_CSUM in backend.caps
        self.words = eeprom.contents(self.mac_address, self.device_id, self.subsystem_id,
                                     self.subsystem_vendor_id)
        self.eeprom = eeprom.Microwire(self.words)
        self.phy = Phy()
        self.phy.carrier = backend.link_up
        self.lock = threading.Lock()
        self.work = threading.RLock()
        self.r = [0] * (MMIO_SIZE // 4)
        self.st = [0] * ((STATS_END - STATS_START) // 4)
        self._rx_acc = [0] * len(self.st)    # counted during one receive call
        self._rxbuf = bytearray(RX_SCRATCH)
        self._rxview = memoryview(self._rxbuf)
        self.timers: dict[str, Any] = {}
        self.attached = False
        self.rx_on = False
        self.ioaddr = 0
        self.faults = 0
        self._read = {I_CTRL: self._rd_ctrl, I_STATUS: self._rd_status,
                      I_EECD: self.eeprom.read, I_ICR: self._rd_icr,
                      I_ICS: lambda: self.icr, I_IMS: lambda: self.ims,
                      I_IMC: lambda: 0}
        self._write = {I_CTRL: self._wr_ctrl, I_STATUS: _ignore,
                       I_EECD: self._wr_eecd, I_EERD: self._wr_eerd,
                       I_MDIC: self._wr_mdic, I_ICR: self._wr_icr,
                       I_ICS: self._wr_ics, I_IMS: self._wr_ims,
                       I_IMC: self._wr_imc, I_ITR: self._wr_16,
                       I_RCTL: self._wr_rctl, I_TCTL: self._wr_tctl,
                       I_RDBAL: self._wr_rxring, I_RDBAH: self._wr_rxring,
                       I_RDLEN: self._wr_rxring, I_RDH: self._wr_rdh,
                       I_RDT: self._wr_rdt, I_RDTR: self._wr_rdtr,
                       I_RADV: self._wr_16, I_TDBAL: self._wr_txring,
                       I_TDBAH: self._wr_txring, I_TDLEN: self._wr_txring,
                       I_TDH: self._wr_tdh, I_TDT: self._wr_tdt,
                       I_TIDV: self._wr_16, I_TADV: self._wr_16,
                       I_VET: self._wr_16}
        for i in range(2 * RA_ENTRIES):
            self._write[I_RA + i] = self._wr_ra
        self._power_on()

    # -- state ---------------------------------------------------------------------------
    def _power_on(self) -> None:
        """The state after power-on or CTRL.RST (the caller holds ``work`` once running)."""
        r = self.r
        for i in range(len(r)):
            r[i] = 0
        for i in range(len(self.st)):
            self.st[i] = 0
        r[I_CTRL] = CTRL_SLU | CTRL_SPD_1000
        r[I_PBA] = 0x30
        r[I_LEDCTL] = 0x07068302
        r[I_RXCSUM] = RXCSUM_IPOFL | RXCSUM_TUOFL
        r[I_VET] = 0x8100
        r[I_MANC] = 0
        mac = self.mac_address          # RAR[0] loaded from the EEPROM
        r[I_RA] = int.from_bytes(mac[:4], "little")
        r[I_RA + 1] = int.from_bytes(mac[4:], "little") | RAH_AV
        self._rebuild_rar()
        self.eeprom.reset()
        self.phy.reset()
        self.icr = 0
        self.ims = 0
        self.irq_level = False
        self.itr_next = 0.0
        self.itr_armed = False
        self.rx_delay_armed = False
        self.tx_delay_armed = False
        self.broken = False
        self._txring: tuple[int, int, memoryview] | None = None
        self._rxring: tuple[int, int, memoryview] | None = None
        self._tx_scheduled = False
        self._rx_scheduled = False
        self._tx_blocked = False
        # Frames for the backend, each with the descriptors to mark done once it is out.
        self._tx_pending: deque[tuple[list, tuple | None]] = deque()
        self._tx_ide = False
        self._pkt_reset()
        self.ctx_csum = Context()
        self.ctx_tso = Context()
        self._rx_held: deque[tuple] = deque()
        for t in self.timers.values():
            t.cancel()

    def _pkt_reset(self) -> None:
        self._pieces: list[tuple[int, int]] = []
        self._pkt_len = 0
        self._pkt_first_cmd = -1
        self._pkt_popts = 0
        self._pkt_rs: list[int] = []

    def reset(self) -> None:
        """Machine reset (or CTRL.RST): power-on state; the link stays as the host has it."""
        with self.work:
            with self.lock:
                if self.irq_level:
                    self.set_intx(False)
                self._power_on()
            if self.loop is not None:
                self.loop.call_soon(self._rx_update, owner=self)

    def realize(self) -> None:
        loop = self.loop
        assert loop is not None
        for name, cb in (("itr", self._itr_fired), ("rdtr", self._rx_timer_fired),
                         ("radv", self._rx_timer_fired), ("tidv", self._tx_timer_fired),
                         ("tadv", self._tx_timer_fired)):
            self.timers[name] = loop.timer(cb, owner=self)
        self.backend.attach(LinkCallbacks(readable=self._on_readable, link=self._on_link,
                                          writable=self._on_writable))
        self.backend.set_offloads(frozenset())   # the guest takes only complete frames
        self.attached = True
        with self.lock:
            self.phy.set_carrier(self.backend.link_up)

    def close(self) -> None:
        if self.attached:
            self.attached = False
            try:
                self.backend.detach()
            except Exception as e:  # the backend's business; the NIC goes anyway
                log.warning("%s: detaching the backend: %s", self.name, e)
        for t in self.timers.values():
            t.close()
        self.timers = {}
        self._txring = self._rxring = None
        self._tx_pending.clear()
        self._rx_held.clear()

    def fault(self, reason: str) -> None:
        """Guest input the NIC cannot serve: its DMA stops until the driver resets it."""
        self.faults += 1
        if not self.broken:
            log.error("%s: %s: DMA stopped until the driver resets the device", self.name,
                      reason)
        self.broken = True
        self._txring = self._rxring = None
        self._tx_pending.clear()
        self._rx_held.clear()
        self._pkt_reset()
        if self.rx_on and self.attached:
            self.rx_on = False
            self.backend.set_rx(False)

    def recover(self) -> None:
        self.broken = False

    # -- snapshots ---------------------------------------------------------------------------
    state_version = 1

    def device_state(self) -> dict:
        """The register file and the counters, interrupt cause/mask/level, the EEPROM's and
        the PHY's state, both transmit contexts, the packet half gathered (descriptors taken,
        EOP not yet seen: its buffers' addresses), packets the backend had no room for (their
        bytes and the descriptors to mark done), frames held for want of receive buffers,
        and which delay timers run (re-armed at restore). Host-side: the backend, whether it
        is polled, the scheduled calls; the EEPROM words are configuration (the MAC)."""
        with self.work, self.lock:
            now = time.monotonic()
            pending = [[[bytes(p) for p in frame], list(done[1]) if done else None]
                       for frame, done in self._tx_pending]
            return versioned(self.state_version, {
                "r": self.r, "st": self.st, "icr": self.icr, "ims": self.ims,
                "irq_level": self.irq_level, "ioaddr": self.ioaddr, "broken": self.broken,
                "itr_left": max(0.0, self.itr_next - now) if self.itr_next else 0.0,
                "itr_armed": self.itr_armed, "rx_delay_armed": self.rx_delay_armed,
                "tx_delay_armed": self.tx_delay_armed, "tx_ide": self._tx_ide,
                "ctx_csum": list(astuple(self.ctx_csum)),
                "ctx_tso": list(astuple(self.ctx_tso)),
                "pieces": self._pieces, "pkt_len": self._pkt_len,
                "pkt_first_cmd": self._pkt_first_cmd, "pkt_popts": self._pkt_popts,
                "pkt_rs": self._pkt_rs, "tx_pending": pending, "rx_held": self._rx_held,
                "phy": [self.phy.regs, self.phy.carrier, self.phy.autoneg_done,
                        self.phy.latched_down],
                "eeprom": list(plain_fields(self.eeprom, ("words",)).items())})

    def load_device_state(self, state: dict) -> None:
        """Into a fresh (realized) device: the link is the new backend's (a change from the
        saved one raises LSC), delay and ITR timers run again, both rings are looked at."""
        f = check_version(self.name, state, self.state_version)
        with self.work, self.lock:
            if len(f["r"]) != len(self.r) or len(f["st"]) != len(self.st):
                raise ValueError(f"{self.name}: register file of another size")
            self.r[:], self.st[:] = f["r"], f["st"]
            self._rebuild_rar()
            self._txring = self._rxring = None
            self.icr, self.ims, self.ioaddr = f["icr"], f["ims"], f["ioaddr"]
            self.irq_level, self.broken = f["irq_level"], f["broken"]
            self.itr_armed = f["itr_armed"]
            self.itr_next = time.monotonic() + f["itr_left"] if f["itr_left"] else 0.0
            self.rx_delay_armed, self.tx_delay_armed = f["rx_delay_armed"], f["tx_delay_armed"]
            self._tx_ide = f["tx_ide"]
            self.ctx_csum, self.ctx_tso = Context(*f["ctx_csum"]), Context(*f["ctx_tso"])
            self._pieces = [tuple(p) for p in f["pieces"]]
            self._pkt_len, self._pkt_first_cmd = f["pkt_len"], f["pkt_first_cmd"]
            self._pkt_popts, self._pkt_rs = f["pkt_popts"], list(f["pkt_rs"])
            ring = self._ring(I_TDBAL, None, "transmit") if f["tx_pending"] else None
            self._tx_pending = deque(
                (frame, (ring[2], tuple(done)) if done and ring else None)
                for frame, done in f["tx_pending"])
            self._rx_held = deque(tuple(item) for item in f["rx_held"])
            phy = self.phy
            phy.regs[:], phy.carrier, phy.autoneg_done, phy.latched_down = f["phy"]
            load_fields(self.eeprom, dict(f["eeprom"]))
            self._tx_blocked = False
            self.set_intx(self.irq_level)
            if self.phy.set_carrier(self.backend.link_up):
                self.icr |= ICR_LSC
            self._update_irq()
        timers = self.timers
        if timers:
            if self.itr_armed:
                timers["itr"].arm(f["itr_left"])
            if self.rx_delay_armed:
                timers["rdtr"].arm(self.r[I_RDTR] * USEC)
                if self.r[I_RADV]:
                    timers["radv"].arm(self.r[I_RADV] * USEC)
            if self.tx_delay_armed:
                timers["tidv"].arm(self.r[I_TIDV] * USEC)
                if self.r[I_TADV]:
                    timers["tadv"].arm(self.r[I_TADV] * USEC)
        self._kick_tx()
        self._kick_rx()

    def config_changed(self, offset: int, size: int) -> None:
        super().config_changed(offset, size)
        if offset <= COMMAND + 1 and offset + size > COMMAND and self.loop is not None:
            self._kick_tx()          # bus mastering may be back on
            self._kick_rx()

    # -- register access (vCPU threads) ------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == 1:
            if offset == IOADDR:
                return self.ioaddr & ((1 << 8 * size) - 1)
            if IODATA <= offset < IODATA + 4:
                return self._read_sized((self.ioaddr & (MMIO_SIZE - 4)) + offset - IODATA,
                                        size)
            return 0
        if size == 4 and not offset & 3:
            return self._rd(offset >> 2)
        return self._read_sized(offset, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == 1:
            if offset == IOADDR and size == 4:
                self.ioaddr = value & 0x1FFFF
            elif IODATA <= offset < IODATA + 4:
                self._write_sized((self.ioaddr & (MMIO_SIZE - 4)) + offset - IODATA, size,
                                  value)
            return
        if size == 4 and not offset & 3:
            self._wr(offset >> 2, value & 0xFFFFFFFF)
        else:
            self._write_sized(offset, size, value)

    def _read_sized(self, offset: int, size: int) -> int:
        if size == 8 and not offset & 7:
            return self._rd(offset >> 2) | self._rd((offset >> 2) + 1) << 32
        shift = 8 * (offset & 3)
        if shift + 8 * size > 32:
            return 0
        return self._rd(offset >> 2) >> shift & ((1 << 8 * size) - 1)

    def _write_sized(self, offset: int, size: int, value: int) -> None:
        if size == 8 and not offset & 7:
            self._wr(offset >> 2, value & 0xFFFFFFFF)
            self._wr((offset >> 2) + 1, value >> 32 & 0xFFFFFFFF)
            return
        shift = 8 * (offset & 3)
        if shift + 8 * size > 32:
            return
        i = offset >> 2
        mask = ((1 << 8 * size) - 1) << shift
        old = self.r[i] if i not in self._read else 0     # no read side effects (ICR)
        self._wr(i, (old & ~mask) | (value << shift & mask))

    def _rd(self, i: int) -> int:
        h = self._read.get(i)
        if h is not None:
            return h()
        if 0x1000 <= i < 0x1040:
            return self._rd_stat(i)
        return self.r[i]

    def _wr(self, i: int, value: int) -> None:
        h = self._write.get(i)
        if h is not None:
            h(i, value)
        elif not 0x1000 <= i < 0x1040:       # the counters are read-only
            self.r[i] = value

    # -- individual registers ---------------------------------------------------------------
    def _rd_ctrl(self) -> int:
        return self.r[0]

    def _rd_status(self) -> int:
        v = STATUS_FD | STATUS_SPEED_1000 | STATUS_ASDV_1000
        if self.phy.link:
            v |= STATUS_LU
        return v

    def _wr_ctrl(self, i: int, v: int) -> None:
        if v & CTRL_RST:
            self.reset()
            return
        self.r[i] = v & ~(CTRL_RST | CTRL_PHY_RST)
        if v & CTRL_PHY_RST:
            with self.lock:
                self.phy.reset()

    def _wr_eecd(self, i: int, v: int) -> None:
        self.eeprom.write(v)

    def _wr_eerd(self, i: int, v: int) -> None:
        if v & EERD_START:
            addr = v >> EERD_ADDR_SHIFT & 0xFF
            data = self.words[addr] if addr < eeprom.WORDS else 0
            self.r[i] = data << EERD_DATA_SHIFT | addr << EERD_ADDR_SHIFT | EERD_DONE
        else:
            self.r[i] = v & ~EERD_DONE

    def _wr_mdic(self, i: int, v: int) -> None:
        op = v >> MDIC_OP_SHIFT & 3
        phy = v >> MDIC_PHY_SHIFT & 0x1F
        reg = v >> MDIC_REG_SHIFT & 0x1F
        data = v & MDIC_DATA
        with self.lock:
            if phy != PHY_ADDR or op not in (MDIC_OP_READ, MDIC_OP_WRITE):
                self.r[i] = (v & ~MDIC_DATA) | MDIC_READY | MDIC_ERROR
            elif op == MDIC_OP_READ:
                data = self.phy.read(reg)
                self.r[i] = (v & ~(MDIC_DATA | MDIC_ERROR)) | data | MDIC_READY
            else:
                if self.phy.write(reg, data):
                    self.icr |= ICR_LSC
                self.r[i] = (v & ~MDIC_ERROR) | MDIC_READY
            if v & MDIC_INT_EN:
                self.icr |= ICR_MDAC
            self._update_irq()

    def _rd_icr(self) -> int:
        with self.lock:
            v = self.icr
            self.icr = 0
            self._update_irq()
        return v

    def _wr_icr(self, i: int, v: int) -> None:
        with self.lock:
            self.icr &= ~v
            self._update_irq()

    def _wr_ics(self, i: int, v: int) -> None:
        with self.lock:
            self.icr |= v & ICR_MASK
            self._update_irq()

    def _wr_ims(self, i: int, v: int) -> None:
        with self.lock:
            self.ims |= v & ICR_MASK
            self._update_irq()

    def _wr_imc(self, i: int, v: int) -> None:
        with self.lock:
            self.ims &= ~v
            self._update_irq()

    def _wr_16(self, i: int, v: int) -> None:
        self.r[i] = v & 0xFFFF

    def _wr_rctl(self, i: int, v: int) -> None:
        self.r[i] = v
        self._kick_rx()

    def _wr_tctl(self, i: int, v: int) -> None:
        self.r[i] = v
        if v & TCTL_EN:
            self._kick_tx()

    def _wr_rxring(self, i: int, v: int) -> None:
        if i == I_RDLEN:
            v &= 0xFFF80
        elif i == I_RDBAL:
            v &= ~0xF
        self.r[i] = v
        self._rxring = None

    def _wr_txring(self, i: int, v: int) -> None:
        if i == I_TDLEN:
            v &= 0xFFF80
        elif i == I_TDBAL:
            v &= ~0xF
        self.r[i] = v
        self._txring = None

    def _wr_rdh(self, i: int, v: int) -> None:
        self.r[i] = v & 0xFFFF

    def _wr_rdt(self, i: int, v: int) -> None:
        self.r[i] = v & 0xFFFF
        # While the backend is being read, the next frame finds the new tail by itself: only
        # a receiver that stopped for want of buffers needs waking (the loop side re-reads
        # the tail after stopping, so a write in between is not lost).
        if not self.rx_on or self._rx_held:
            self._kick_rx()

    def _wr_tdh(self, i: int, v: int) -> None:
        self.r[i] = v & 0xFFFF

    def _wr_tdt(self, i: int, v: int) -> None:
        self.r[i] = v & 0xFFFF
        self._kick_tx()

    def _wr_rdtr(self, i: int, v: int) -> None:
        self.r[i] = v & 0xFFFF
        if v & RDTR_FPD and self.rx_delay_armed and self.loop is not None:
            self.loop.call_soon(self._rx_timer_fired, owner=self)

    def _wr_ra(self, i: int, v: int) -> None:
        self.r[i] = v
        self._rebuild_rar()

    def _rebuild_rar(self) -> None:
        base = I_RA
        rar = set()
        for n in range(RA_ENTRIES):
            low, high = self.r[base + 2 * n], self.r[base + 2 * n + 1]
            if high & RAH_AV and not high >> 16 & 3:       # ASEL 00: destination address
                rar.add(low.to_bytes(4, "little") + (high & 0xFFFF).to_bytes(2, "little"))
        self._rar = frozenset(rar)

    def _rd_stat(self, i: int) -> int:
        off = i << 2
        k = (off - STATS_START) >> 2
        st = self.st
        with self.lock:
            if off in STATS64:                 # low half: clears the low half
                v = st[k]
                st[k] = v & ~0xFFFFFFFF
                return v & 0xFFFFFFFF
            if off - 4 in STATS64:             # high half: clears the counter
                v = st[k - 1]
                st[k - 1] = 0
                return min(v >> 32, 0xFFFFFFFF)
            v = st[k]
            st[k] = 0
            return min(v, 0xFFFFFFFF)

    # -- interrupts (self.lock held) ---------------------------------------------------------
    def _update_irq(self) -> None:
        if self.icr & self.ims:
            if not self.irq_level:
                now = time.monotonic()
                if now >= self.itr_next:
                    self.irq_level = True
                    self.set_intx(True)
                    itr = self.r[I_ITR]
                    self.itr_next = now + itr * 256e-9 if itr else 0.0
                elif not self.itr_armed and "itr" in self.timers:
                    self.itr_armed = True
                    self.timers["itr"].arm(self.itr_next - now)
        elif self.irq_level:
            self.irq_level = False
            self.set_intx(False)

    def _cause(self, bits: int) -> None:
        with self.lock:
            self.icr |= bits
            self._update_irq()

    def _itr_fired(self) -> None:
        with self.lock:
            self.itr_armed = False
            self.itr_next = 0.0
            self._update_irq()

    def _rx_timer_fired(self) -> None:
        if not self.rx_delay_armed:
            return
        self.rx_delay_armed = False
        self.timers["rdtr"].cancel()
        self.timers["radv"].cancel()
        self._cause(ICR_RXT0)

    def _tx_timer_fired(self) -> None:
        if not self.tx_delay_armed:
            return
        self.tx_delay_armed = False
        self.timers["tidv"].cancel()
        self.timers["tadv"].cancel()
        self._cause(ICR_TXDW)

    # -- backend callbacks (event loop) ----------------------------------------------------
    def _on_link(self, up: bool) -> None:
        with self.lock:
            if self.phy.set_carrier(up):
                self.icr |= ICR_LSC
                self._update_irq()

    def _on_readable(self) -> None:
        self._rx_run()

    def _on_writable(self) -> None:
        self._tx_blocked = False
        self._tx_run()

    # -- scheduling --------------------------------------------------------------------------
    def _kick_tx(self) -> None:
        if not self._tx_scheduled and self.loop is not None:
            self._tx_scheduled = True
            self.loop.call_soon(self._tx_run, owner=self)

    def _kick_rx(self) -> None:
        if not self._rx_scheduled and self.loop is not None:
            self._rx_scheduled = True
            self.loop.call_soon(self._rx_run, owner=self)

    def _set_rx(self, on: bool) -> None:
        if on != self.rx_on and self.attached:
            self.rx_on = on
            self.backend.set_rx(on)

    def _rx_update(self) -> None:
        """After a reset: receive is off until the driver enables it again."""
        with self.work:
            if not self.r[I_RCTL] & RCTL_EN:
                self._set_rx(False)

    # -- rings -------------------------------------------------------------------------------
    def _ring(self, base_reg: int, cached: tuple[int, int, memoryview] | None,
              what: str) -> tuple[int, int, memoryview]:
        r = self.r
        base = r[base_reg] | r[base_reg + 1] << 32
        length = r[base_reg + 2]
        if cached is not None and cached[0] == base and cached[1] == length:
            return cached
        try:
            view = self.dma.view(base, length) if length else memoryview(b"")
        except GuestError as e:
            raise GuestError(f"{what} ring {base:#x}+{length:#x} is outside guest RAM") \
                from e
        return base, length, view

    # -- transmit (event loop) ---------------------------------------------------------------
    def _tx_run(self) -> None:
        self._tx_scheduled = False
        with self.work:
            if self.broken or self._tx_blocked:
                return
            try:
                more = self._tx_process()
            except GuestError as e:
                self.fault(str(e))
                return
        if more:
            self._kick_tx()

    def _tx_process(self) -> bool:
        """Serve the transmit ring; True when there is more to do than one call's budget.

        Packets are gathered into ``_tx_pending`` and handed to the backend in batches
        (``send_many``: one system call per burst on a stream socket); a packet's
        descriptors get DD only once all of its frames are out."""
        r = self.r
        if not r[I_TCTL] & TCTL_EN or not self.dma.enabled:
            return False
        pending = self._tx_pending
        if pending:                          # frames the backend had no room for
            ok, rs = self._tx_flush()
            if rs:
                self._tx_interrupt()
            if not ok:
                return False
        ring = self._txring = self._ring(I_TDBAL, self._txring, "transmit")
        view = ring[2]
        count = ring[1] // DESC_SIZE
        if count == 0:
            return False
        head, tail = r[I_TDH], r[I_TDT]
        if head >= count or tail >= count:
            raise GuestError(f"transmit head {head} or tail {tail} outside the "
                             f"{count}-descriptor ring")
        budget = TX_BUDGET
        done_rs = False
        ok = True
        unpack = _DESC.unpack_from
        quick: list[tuple[int, int]] = []    # one-descriptor packets, checked together
        quick_done: list[tuple | None] = []
        while head != tail and budget:
            budget -= 1
            index = head
            off = index * DESC_SIZE
            addr, lower, upper = unpack(view, off)
            cmd = lower >> 24
            head = head + 1 if head + 1 < count else 0
            if cmd & TXD_CMD_DEXT:
                dtyp = lower >> 20 & 0xF
                if dtyp == TXD_DTYP_C:       # context descriptor: no buffer
                    self._tx_context(addr, lower, upper)
                    if cmd & TXD_CMD_RS:
                        view[off + 12] |= TXD_STAT_DD
                        done_rs = True
                    continue
                if dtyp != TXD_DTYP_D:
                    raise GuestError(f"transmit descriptor {index} has type {dtyp}")
                length = lower & 0xFFFFF
            else:
                length = lower & 0xFFFF
                # The common case: a whole plain packet in one legacy descriptor.
                if cmd & TXD_CMD_EOP and not cmd & (TXD_CMD_IC | TXD_CMD_VLE) and \
                        self._pkt_first_cmd < 0 and length:
                    if length > MAX_FRAME:
                        raise GuestError(f"transmit packet of {length} bytes (over "
                                         f"{MAX_FRAME}) at descriptor {index}")
                    self._tx_ide = bool(cmd & TXD_CMD_IDE)
                    quick.append((addr, length))
                    quick_done.append((view, (off,)) if cmd & TXD_CMD_RS else None)
                    if len(quick) >= TX_BATCH:
                        self._tx_quick(quick, quick_done)
                        ok, rs = self._tx_flush()
                        done_rs |= rs
                        if not ok:
                            break
                    continue
            if length == 0:
                raise GuestError(f"zero-length transmit buffer in descriptor {index}")
            if quick:                        # keep the order of the packets
                self._tx_quick(quick, quick_done)
            if self._pkt_first_cmd < 0:
                self._pkt_first_cmd = cmd
                self._pkt_popts = upper >> 8 & 0xFF
            self._pkt_len += length
            first = self._pkt_first_cmd
            limit = MAX_TSO if first & TXD_CMD_DEXT and first & TXD_CMD_TSE else MAX_FRAME
            if self._pkt_len > limit:
                raise GuestError(f"transmit packet of {self._pkt_len}+ bytes (over {limit}) "
                                 f"at descriptor {index}")
            self._pieces.append((addr, length))
            if cmd & TXD_CMD_RS:
                self._pkt_rs.append(off)
            if cmd & TXD_CMD_EOP:
                self._tx_ide = bool(cmd & TXD_CMD_IDE)
                self._tx_packet(view, cmd, lower, upper)
                if len(pending) >= TX_BATCH:
                    ok, rs = self._tx_flush()
                    done_rs |= rs
                    if not ok:
                        break
        if quick:
            self._tx_quick(quick, quick_done)
        if ok and pending:
            ok, rs = self._tx_flush()
            done_rs |= rs
        r[I_TDH] = head
        if done_rs:
            self._tx_interrupt()
        if head == tail and not pending:
            self._cause(ICR_TXQE)
        return ok and head != tail

    def _tx_quick(self, quick: list[tuple[int, int]], done: list[tuple | None]) -> None:
        """One-descriptor packets into ``_tx_pending``: their buffers checked against guest
        RAM in one scatter-gather list (no zero lengths: each piece is one view)."""
        try:
            views = self.dma.sg(quick).views
        except GuestError as e:
            raise GuestError(f"transmit buffer outside guest RAM: {e}") from e
        pending = self._tx_pending
        if self.vnet:
            for v, d in zip(views, done, strict=True):
                pending.append(([VNET_NONE, v], d))
        else:
            for v, d in zip(views, done, strict=True):
                pending.append(([v], d))
        quick.clear()
        done.clear()

    def _tx_context(self, addr: int, lower: int, upper: int) -> None:
        tucmd = lower >> 24
        ctx = Context(ipcss=addr & 0xFF, ipcso=addr >> 8 & 0xFF, ipcse=addr >> 16 & 0xFFFF,
                      tucss=addr >> 32 & 0xFF, tucso=addr >> 40 & 0xFF,
                      tucse=addr >> 48 & 0xFFFF, paylen=lower & 0xFFFFF, tucmd=tucmd,
                      hdr_len=upper >> 8 & 0xFF, mss=upper >> 16)
        # A TSE context and a checksum context are kept apart: Windows' driver interleaves
        # them (QEMU learnt that the hard way: UDP checksums broken after a TSO).
        if tucmd & TUCMD_TSE:
            self.ctx_tso = ctx
        else:
            self.ctx_csum = ctx

    def _tx_packet(self, view: memoryview, cmd: int, lower: int, upper: int) -> None:
        """The packet whose last descriptor this is: gather and offload it into
        ``_tx_pending`` (its last frame carries the descriptors to mark done)."""
        first = self._pkt_first_cmd
        popts = self._pkt_popts
        pieces = self._pieces
        done = (view, self._pkt_rs) if self._pkt_rs else None
        self._pkt_reset()
        sg = self.dma.sg(pieces)              # every buffer checked against guest RAM
        views = sg.views
        vlan = upper >> 16 if cmd & TXD_CMD_VLE and self.r[I_CTRL] & CTRL_VME else None
        ext = bool(first & TXD_CMD_DEXT)
        tso = ext and bool(first & TXD_CMD_TSE)
        try:
            if tso:
                frames = self._tso(b"".join(views), popts, vlan)
                with self.lock:
                    self.st[S_TSCTC] += 1
            elif ext and popts & (POPTS_IXSM | POPTS_TXSM):
                frames = [self._csum(b"".join(views), popts, vlan)]
            elif not ext and cmd & TXD_CMD_IC:
                buf = bytearray(b"".join(views))
                insert_checksum(buf, upper >> 8 & 0xFF, lower >> 16 & 0xFF)
                frames = [self._finish(buf, vlan)]
            elif vlan is not None:
                frames = [self._finish(bytearray(b"".join(views)), vlan)]
            elif self.vnet:
                frames = [[VNET_NONE, *views]]
            else:
                frames = [views]
        except OffloadError as e:
            if tso:
                with self.lock:
                    self.st[S_TSCTFC] += 1
            log.debug("%s: transmit offload: %s: packet dropped", self.name, e)
            frames = []
        pending = self._tx_pending
        for f in frames[:-1]:
            pending.append((f, None))
        if frames:
            pending.append((frames[-1], done))
        elif done is not None:                # dropped: its descriptors are still done
            for off in done[1]:
                view[off + 12] |= TXD_STAT_DD

    def _finish(self, buf: bytearray, vlan: int | None, hdr: bytes = VNET_NONE) -> list:
        """VLAN tag insertion, then the pieces to send. Short frames go out as they are
        (TCTL.PSP pads on a wire, not on a virtual link): the receiving NIC pads them. (Linux's
        driver pads every frame itself; the ``user`` backend strips that padding, which passt
        would take for TCP payload.)"""
        if vlan is not None:
            buf[12:12] = struct.pack(">HH", self.r[I_VET] & 0xFFFF, vlan)
        return [hdr, buf] if self.vnet else [buf]

    def _csum(self, data: bytes, popts: int, vlan: int | None) -> list:
        ctx = self.ctx_csum
        buf = bytearray(data)
        ip, l4 = bool(popts & POPTS_IXSM), bool(popts & POPTS_TXSM)
        if l4 and self.csum_passthrough and ctx.tucse == 0 and \
                ctx.tucss < ctx.tucso <= len(buf) - 2:
            checksum(buf, ctx, ip, False)     # the backend finishes the TCP/UDP one
            shift = 4 if vlan is not None else 0
            hdr = _VNET.pack(VNET_F_NEEDS_CSUM, 0, 0, 0, ctx.tucss + shift,
                             ctx.tucso - ctx.tucss, 0)
            return self._finish(buf, vlan, hdr)
        checksum(buf, ctx, ip, l4)
        return self._finish(buf, vlan)

    def _tso(self, data: bytes, popts: int, vlan: int | None) -> list[list]:
        ctx = self.ctx_tso
        ip, l4 = bool(popts & POPTS_IXSM), bool(popts & POPTS_TXSM)
        gso = GSO_TCPV4 if ctx.ipv4 else GSO_TCPV6
        if ctx.tcp and l4 and self.gso_caps[gso] and len(data) - ctx.hdr_len > ctx.mss:
            buf = tso_as_gso(data, ctx, ip)   # the backend segments
            shift = 4 if vlan is not None else 0
            hdr = _VNET.pack(VNET_F_NEEDS_CSUM, gso, ctx.hdr_len + shift, ctx.mss,
                             ctx.tucss + shift, ctx.tucso - ctx.tucss, 0)
            return [self._finish(buf, vlan, hdr)]
        return [self._finish(f, vlan) for f in segment(data, ctx, ip, l4)]

    def _tx_flush(self) -> tuple[bool, bool]:
        """Hand what is pending to the backend; (all sent, some descriptor marked done)."""
        pending = self._tx_pending
        frames = [f for f, _ in pending]
        n = self.backend.send_many(frames)
        skip = 1 if self.vnet else 0
        packets = octets = mcast = bcast = 0
        bins = [0] * 6
        rs = False
        for _ in range(n):
            frame, done = pending.popleft()
            size = 4 - (VNET_HDR_LEN if skip else 0)       # with the FCS, without the header
            for p in frame:
                size += len(p)
            packets += 1
            octets += size
            b = _BIN[size] if size < len(_BIN) else -1
            if b >= 0:
                bins[b] += 1
            start = frame[skip]
            if start[0] & 1:
                if len(start) < 6:
                    start = b"".join(bytes(p) for p in frame[skip:])
                if bytes(start[:6]) == BROADCAST:
                    bcast += 1
                else:
                    mcast += 1
            if done is not None:
                view, offsets = done
                for off in offsets:
                    view[off + 12] |= TXD_STAT_DD
                rs = True
        if packets:
            st = self.st
            with self.lock:
                st[S_GPTC] += packets
                st[S_TPT] += packets
                st[S_GOTC] += octets
                st[S_TOT] += octets
                st[S_BPTC] += bcast
                st[S_MPTC] += mcast
                for i, c in enumerate(bins):
                    st[S_PTC64 + i] += c
        if pending:
            self._tx_blocked = True
            return False, rs
        return True, rs

    def _tx_interrupt(self) -> None:
        tidv = self.r[I_TIDV]
        if self._tx_ide and tidv and "tidv" in self.timers:
            self.timers["tidv"].arm(tidv * USEC)
            tadv = self.r[I_TADV]
            if tadv and not self.tx_delay_armed:
                self.timers["tadv"].arm(tadv * USEC)
            self.tx_delay_armed = True
        else:
            self._cause(ICR_TXDW)

    # -- receive (event loop) ----------------------------------------------------------------
    def _rx_run(self) -> None:
        self._rx_scheduled = False
        with self.work:
            if self.broken:
                return
            try:
                more = self._rx_process()
            except GuestError as e:
                self.fault(str(e))
                return
        if more:
            self._kick_rx()

    def _rx_bufsize(self) -> int:
        rctl = self.r[I_RCTL]
        code = rctl >> RCTL_BSIZE_SHIFT & 3
        if rctl & RCTL_BSEX:
            return _BSIZES_EXT[code] or 2048      # BSEX with size 00 is reserved
        return _BSIZES[code]

    def _rx_process(self) -> bool:
        """Move frames from the backend into the receive ring; True when the budget ran out
        with frames possibly left (the backend does not signal those again)."""
        r = self.r
        rctl = r[I_RCTL]
        if not rctl & RCTL_EN or not self.dma.enabled:
            self._set_rx(False)
            return False
        ring = self._rxring = self._ring(I_RDBAL, self._rxring, "receive")
        view = ring[2]
        count = ring[1] // DESC_SIZE
        if count == 0:
            self._set_rx(False)
            return False
        head = r[I_RDH]
        bufsize = self._rx_bufsize()
        crc = 0 if rctl & RCTL_SECRC else 4
        held = self._rx_held
        recv = self.backend.recv_into
        stored = 0
        budget = RX_BUDGET
        tail = r[I_RDT]
        while budget:
            tail = r[I_RDT]
            if head >= count or tail >= count:
                raise GuestError(f"receive head {head} or tail {tail} outside the "
                                 f"{count}-descriptor ring")
            free = tail - head if tail >= head else tail + count - head
            if held:
                item = held[0]
            else:
                if free == 0:
                    break
                n = recv(self._rxview)
                if n <= 0:
                    break
                item = self._rx_accept(n)
                if item is None:
                    continue
            need = -(-(len(item[0]) + crc) // bufsize)
            if need > free:
                if need >= count:            # can never fit this ring: dropped
                    if held:
                        held.popleft()
                    self._rx_acc[S_MPC] += 1
                    continue
                if not held:                 # kept until the driver posts more buffers
                    held.append((bytes(item[0]), *item[1:]))
                    self._rx_acc[S_RNBC] += 1
                break
            if held:
                held.popleft()
            head = self._rx_store(view, count, head, item, bufsize, crc)
            r[I_RDH] = head
            stored += 1
            budget -= 1
            if not stored & 15:
                # Let a vCPU thread that waits for the GIL in (an RDT write, an ICR read) have
                # it now instead of after the interpreter's switch interval (5 ms): frames the
                # backend has buffered cost no system call, so nothing else would release it.
                _release_gil(0)
        self._rx_counters()
        if stored:
            self._rx_interrupt(head, tail, count)
        tail = r[I_RDT]
        free = (tail - head) % count if tail < count else 0
        self._set_rx(free > 0 and not held)
        if not self.rx_on and r[I_RDT] != tail:
            return True                      # buffers posted while stopping: go again
        return budget == 0

    def _rx_accept(self, n: int) -> tuple | None:
        """Filter and classify one frame from the backend: (frame, status, errors, special)
        or None when it is not for the guest (counted)."""
        r = self.r
        frame = self._rxview[:n]
        valid = False
        if self.vnet:
            if n < VNET_HDR_LEN:
                return None
            flags, gso, _hl, _gs, cstart, coff, _nb = _VNET.unpack_from(self._rxbuf, 0)
            frame = frame[VNET_HDR_LEN:]
            if gso & 0x7F:                    # the backend was told: no GSO for an e1000
                self.backend.rx_dropped += 1
                return None
            if flags & VNET_F_NEEDS_CSUM:
                buf = bytearray(frame)
                if not complete_partial(buf, cstart, coff):
                    return None
                frame = memoryview(buf)
                valid = True
            elif flags & VNET_F_DATA_VALID:
                valid = True
        length = len(frame)
        rctl = r[I_RCTL]
        tagged = length >= 18 and (frame[12] << 8 | frame[13]) == r[I_VET]
        # A long packet is one over 1522 bytes with its FCS, tagged or not (8254x SDM,
        # RCTL.LPE): 1518 bytes here.
        limit = 16384 if rctl & RCTL_LPE else 1522
        drop = 0
        dst = bytes(frame[:6])
        if length < 14:
            drop = S_RUC
        elif length + 4 > limit:
            drop = S_ROC
        elif dst not in self._rar and not self._accept(dst, rctl):
            drop = -1
        elif tagged and rctl & RCTL_VFE:
            vid = (frame[14] << 8 | frame[15]) & 0xFFF
            if not r[I_VFTA + (vid >> 5)] >> (vid & 31) & 1:
                drop = -1
        acc = self._rx_acc
        if drop:
            acc[S_TPR] += 1
            acc[S_TOR] += length + 4
            if drop > 0:
                acc[drop] += 1
            return None
        special = 0
        status = RXD_STAT_DD
        if tagged and r[I_CTRL] & CTRL_VME:        # strip the tag into "special"
            special = frame[14] << 8 | frame[15]
            frame = memoryview(bytes(frame[:12]) + bytes(frame[16:]))
            status |= RXD_STAT_VP
            tagged = False
        if len(frame) < MIN_FRAME:                       # a runt from the host: padded
            frame = memoryview(bytes(frame) + bytes(MIN_FRAME - len(frame)))
        rxcsum = r[I_RXCSUM]
        l3type = frame[16] << 8 | frame[17] if tagged else frame[12] << 8 | frame[13]
        if l3type != 0x0800 and l3type != 0x86DD:
            status |= RXD_STAT_IXSM
            errors = 0
        elif valid and rxcsum & RXCSUM_TUOFL:
            status |= RXD_STAT_IPCS | RXD_STAT_TCPCS
            errors = 0
        else:
            cs, errors = rx_checksum(frame, 18 if tagged else 14, bool(rxcsum & RXCSUM_IPOFL),
                                     bool(rxcsum & RXCSUM_TUOFL))
            status |= cs
        wire = len(frame) + 4
        b = _BIN[wire] if wire < len(_BIN) else -1
        acc[S_TPR] += 1
        acc[S_TOR] += length + 4
        acc[S_GPRC] += 1
        acc[S_GORC] += wire
        if b >= 0:
            acc[S_PRC64 + b] += 1
        if dst[0] & 1:
            acc[S_BPRC if dst == BROADCAST else S_MPRC] += 1
        return frame, status, errors, special

    def _rx_counters(self) -> None:
        """Add what this call counted (loop thread only, no lock) to the statistics."""
        acc = self._rx_acc
        st = self.st
        with self.lock:
            for i, v in enumerate(acc):
                if v:
                    st[i] += v
                    acc[i] = 0

    def _accept(self, dst: bytes, rctl: int) -> bool:
        """The receive filter: exact addresses (RAR), promiscuous modes, broadcast, the
        multicast hash (MTA, on the bits RCTL.MO picks)."""
        if dst in self._rar:
            return True
        if dst[0] & 1:
            if rctl & RCTL_MPE:
                return True
            if dst == BROADCAST and rctl & RCTL_BAM:
                return True
            shift = _MO_SHIFT[rctl >> RCTL_MO_SHIFT & 3]
            h = (dst[4] >> shift | dst[5] << (8 - shift)) & 0xFFF
            return bool(self.r[I_MTA + (h >> 5)] >> (h & 31) & 1)
        return bool(rctl & RCTL_UPE)

    def _rx_store(self, view: memoryview, count: int, head: int, item: tuple, bufsize: int,
                  crc: int) -> int:
        """Write one frame (and its FCS) into descriptors from ``head``; the new head."""
        frame, status, errors, special = item
        flen = len(frame)
        total = flen + crc
        off = head * DESC_SIZE
        addr = _Q.unpack_from(view, off)[0]
        if total <= bufsize:                 # the usual case: one buffer
            try:
                dst = self.dma.view(addr, total)
            except GuestError as e:
                raise GuestError(f"receive buffer {addr:#x}+{total:#x} (descriptor {head}) "
                                 "is outside guest RAM") from e
            dst[:flen] = frame
            if crc:
                dst[flen:] = zlib.crc32(frame).to_bytes(4, "little")
            _RXWB.pack_into(view, off + 8, total, 0, status | RXD_STAT_EOP, errors, special)
            return head + 1 if head + 1 < count else 0
        data = bytes(frame)
        if crc:
            data += zlib.crc32(data).to_bytes(4, "little")
        pos = 0
        while True:
            off = head * DESC_SIZE
            addr = _Q.unpack_from(view, off)[0]
            n = min(bufsize, total - pos)
            try:
                self.dma.view(addr, n)[:] = data[pos:pos + n]
            except GuestError as e:
                raise GuestError(f"receive buffer {addr:#x}+{n:#x} (descriptor {head}) is "
                                 "outside guest RAM") from e
            pos += n
            head = head + 1 if head + 1 < count else 0
            if pos >= total:
                _RXWB.pack_into(view, off + 8, n, 0, status | RXD_STAT_EOP, errors, special)
                return head
            _RXWB.pack_into(view, off + 8, n, 0, RXD_STAT_DD, 0, 0)

    def _rx_interrupt(self, head: int, tail: int, count: int) -> None:
        causes = 0
        free = (tail - head) % count
        rdmts = self.r[I_RCTL] >> RCTL_RDMTS_SHIFT & 3
        if free <= count >> (rdmts + 1):
            causes |= ICR_RXDMT0
        rdtr = self.r[I_RDTR]
        if rdtr == 0 or "rdtr" not in self.timers:
            causes |= ICR_RXT0
        else:                                # packet timer restarts, absolute one runs on
            self.timers["rdtr"].arm(rdtr * USEC)
            radv = self.r[I_RADV]
            if radv and not self.rx_delay_armed:
                self.timers["radv"].arm(radv * USEC)
            self.rx_delay_armed = True
        if causes:
            self._cause(causes)


def _size_bin(wire: int) -> int:
    """The PRC/PTC counter for a frame of ``wire`` bytes (with FCS): 64, 65-127, ..., 1023-1522;
    -1 for longer ones (no counter)."""
    if wire <= 64:
        return 0
    if wire <= 127:
        return 1
    if wire <= 255:
        return 2
    if wire <= 511:
        return 3
    if wire <= 1023:
        return 4
    if wire <= 1522:
        return 5
    return -1


#: The PRC/PTC counter of each frame length (with FCS) up to 1522, as a table.
_BIN = [_size_bin(n) for n in range(1523)]


def _ignore(i: int, v: int) -> None:
    pass
