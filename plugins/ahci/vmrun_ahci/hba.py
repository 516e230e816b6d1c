"""The AHCI 1.3 host bus adapter: registers, command lists, FIS receive areas, interrupts.

One PCI function with Intel ICH9's identity (8086:2922, class 01.06.01, what Linux's ``ahci``
and Windows' ``storahci`` bind to), the ABAR in BAR 5, one MSI vector (else INTA#), and
1..32 ports, each with one drive (:mod:`vmrun_ahci.ata` disks, :mod:`vmrun_ahci.atapi` CDs).

Threads: register accesses come from vCPU threads. A PxCI write fetches, checks and starts
the new commands right there, as QEMU's AHCI does: starting one is a few header reads and one
``io_submit`` (or a hand-over to the block queue's workers), never a wait, and it saves the
hop to the event loop on every command. Completions come back on the event loop (the block
queue's), and commands that had to wait (a non-queued command behind queued ones) are started
from there. One re-entrant lock guards the register state; no guest input can make a
register write raise (an unexpected exception breaks only this controller: :meth:`fault`).

Everything a command names in guest memory is guest input: the command header, the command
table and its FIS, the PRDT (at most :data:`MAX_PRDT` entries), every data buffer, the FIS
receive area. A bad address or bus mastering off is a host bus fatal error (PxIS.HBFS), a
malformed FIS or header an interface fatal error (PxIS.IFS), a PRDT shorter than the data
PxIS.OFS with IFS; a command the drive refuses (unknown opcode, LBA past the end, write to a
read-only disk) a task file error (PxIS.TFES, PxTFD.ERR). After any of these the port stops
fetching commands until the driver clears PxCMD.ST, as the specification says, so a hostile
command list costs one pass and the VMM carries on.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import TYPE_CHECKING

from vmrun.api import (
    BAR_MEM32,
    BarSpec,
    BlockQueue,
    GuestError,
    PciDevice,
    SgList,
    VmrunError,
    check_version,
    load_fields,
    plain_fields,
    versioned,
)

if TYPE_CHECKING:
    from vmrun_ahci.ata import Drive

log = logging.getLogger("vmrun.ahci")

ABAR = 5
MAX_PORTS = 32
SLOTS = 32
MAX_PRDT = 4096            # entries per command (Linux uses at most 168): bounds the work
PORT_BASE, PORT_SIZE = 0x100, 0x80

# HBA registers
CAP, GHC, IS, PI, VS, CCC_CTL, CCC_PORTS, EM_LOC, EM_CTL, CAP2, BOHC = (
    0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x28)
CAP_S64A, CAP_SNCQ, CAP_SCLO, CAP_SAM = 1 << 31, 1 << 30, 1 << 24, 1 << 18
ISS_GEN3 = 3
GHC_HR, GHC_IE, GHC_MRSM, GHC_AE = 1 << 0, 1 << 1, 1 << 2, 1 << 31
VERSION = 0x00010300       # AHCI 1.3

# Port registers (offsets inside a port's 0x80 bytes)
P_CLB, P_CLBU, P_FB, P_FBU, P_IS, P_IE, P_CMD, P_TFD, P_SIG, P_SSTS, P_SCTL, P_SERR, \
    P_SACT, P_CI, P_SNTF, P_FBS, P_DEVSLP = (
        0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38,
        0x3C, 0x40, 0x44)
W1_PORT = (P_IS, P_SERR, P_SACT, P_CI)     # registers whose zero bits a write leaves alone

# PxIS bits
IS_DHRS, IS_PSS, IS_DSS, IS_SDBS, IS_UFS, IS_DPS = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
IS_OFS, IS_INFS, IS_IFS, IS_HBDS, IS_HBFS, IS_TFES = (
    1 << 24, 1 << 26, 1 << 27, 1 << 28, 1 << 29, 1 << 30)
IE_MASK = 0xFDC000FF

# PxCMD bits
CMD_ST, CMD_SUD, CMD_POD, CMD_CLO, CMD_FRE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4
CMD_FR, CMD_CR = 1 << 14, 1 << 15
CMD_ATAPI, CMD_DLAE, CMD_ALPE, CMD_ASP = 1 << 24, 1 << 25, 1 << 26, 1 << 27
CMD_WRITABLE = CMD_ST | CMD_FRE | CMD_ATAPI | CMD_DLAE | CMD_ALPE | CMD_ASP

# ATA status bits
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01

# FIS receive area offsets, FIS types
RX_DSFIS, RX_PSFIS, RX_RFIS, RX_SDBFIS = 0x00, 0x20, 0x40, 0x58
FIS_H2D, FIS_D2H, FIS_PIO_SETUP, FIS_SDB = 0x27, 0x34, 0x5F, 0xA1
SIG_ATA, SIG_ATAPI = 0x00000101, 0xEB140101
SSTS_UP = 0x133            # IPM active, Gen3 (6 Gb/s), device present and phy up

_HDR = struct.Struct("<IIII")
_PRD = struct.Struct("<IIII")


class PortFatal(Exception):
    """A command the HBA cannot run: PxIS bits to set (HBFS, IFS, OFS)."""

    def __init__(self, bits: int, why: str) -> None:
        super().__init__(why)
        self.bits = bits


class Command:
    """One fetched command: its slot, the H2D register FIS, the ATAPI CDB and the PRDT."""

    __slots__ = ("port", "slot", "fis", "acmd", "pieces", "prd_irq", "gen", "write", "atapi",
                 "command", "features", "lba", "count", "device", "tag", "nbytes")

    def __init__(self, port: Port, slot: int, fis: bytes, acmd: bytes,
                 pieces: list[tuple[int, int]], prd_irq: bool, write: bool,
                 atapi: bool) -> None:
        self.port, self.slot, self.fis, self.acmd = port, slot, fis, acmd
        self.pieces, self.prd_irq, self.write, self.atapi = pieces, prd_irq, write, atapi
        self.gen = port.gen
        self.command = fis[2]
        self.features = fis[3] | fis[11] << 8
        self.lba = (fis[4] | fis[5] << 8 | fis[6] << 16 | fis[8] << 24 | fis[9] << 32
                    | fis[10] << 40)
        self.device = fis[7]
        self.count = fis[12] | fis[13] << 8
        self.tag = slot
        self.nbytes = 0

    @property
    def lba28(self) -> tuple[int, int]:
        """(LBA, count) of a 28-bit command; a count of 0 means 256 sectors."""
        return self.lba & 0xFFFFFF | (self.device & 0xF) << 24, (self.count & 0xFF) or 256

    def data(self, n: int, exact: bool = True) -> SgList:
        """The first ``n`` bytes the PRDT describes, checked against guest RAM (fewer when
        not ``exact`` and the PRDT is shorter; a shorter PRDT is an overflow otherwise)."""
        out, left = [], n
        for addr, length in self.pieces:
            if left <= 0:
                break
            take = min(length, left)
            out.append((addr, take))
            left -= take
        if left > 0 and exact:
            raise PortFatal(IS_OFS | IS_IFS, f"PRDT holds {n - left} bytes, the command "
                            f"moves {n}")
        try:
            sg = self.port.hba.dma.sg(out)
        except GuestError as e:
            raise PortFatal(IS_HBFS, f"PRDT: {e}") from None
        self.nbytes = sg.nbytes
        return sg


class Port:
    """One port's registers and the commands it has in flight."""

    #: What a snapshot saves (with nothing in flight: the HBA drains first). ``gen`` and the
    #: issue/submit flags only matter while commands run.
    STATE = ("clb", "fb", "is_", "ie", "cmd", "sctl", "serr", "sact", "ci", "ccs", "ssts",
             "tfd", "sig", "started", "ncq_busy", "nonq_busy", "sdb_pending", "halted",
             "in_srst")

    def __init__(self, hba: AhciHba, index: int, drive: Drive) -> None:
        self.hba = hba
        self.index = index
        self.drive = drive
        self.io: BlockQueue | None = None
        self.gen = 0
        self.power_on()

    def power_on(self) -> None:
        self.clb = self.fb = 0
        self.is_ = self.ie = 0
        self.cmd = CMD_SUD | CMD_POD
        self.sctl = self.serr = self.sact = self.ci = 0
        self.ccs = 0
        self.forget()
        self.comreset_done()

    def forget(self) -> None:
        """Drop every command in flight (their completions are ignored from now on)."""
        self.gen += 1
        self.started = 0           # CI bits fetched
        self.ncq_busy = 0          # NCQ tags the device has in flight
        self.nonq_busy = False     # a non-queued command in flight
        self.sdb_pending = 0       # NCQ tags done, not yet in a Set Device Bits FIS
        self.halted = False        # an error stopped command processing until ST is cleared
        self.in_issue = False
        self.in_srst = False
        self.writes_queued = False

    def comreset_done(self) -> None:
        """The device came out of reset: its signature FIS (no interrupt)."""
        self.ssts = SSTS_UP
        self.drive.reset()
        status = self.drive.reset_status
        self.tfd = 0x0100 | status
        self.sig = SIG_ATAPI if self.drive.atapi else SIG_ATA
        self.post_fis(RX_RFIS, _d2h(status, 0x01, self.sig >> 8, self.sig & 0xFF, irq=False))

    # -- registers (lock held) -----------------------------------------------------------------
    def read(self, off: int) -> int:
        if off == P_CI:
            return self.ci
        if off == P_SACT:
            return self.sact
        if off == P_IS:
            return self.is_
        if off == P_TFD:
            return self.tfd
        if off == P_CMD:
            cmd = self.cmd | self.ccs << 8
            if cmd & CMD_ST:
                cmd |= CMD_CR
            if cmd & CMD_FRE:
                cmd |= CMD_FR
            return cmd
        if off == P_IE:
            return self.ie
        if off == P_SSTS:
            return self.ssts
        if off == P_SIG:
            return self.sig
        if off == P_SCTL:
            return self.sctl
        if off == P_SERR:
            return self.serr
        if off == P_CLB:
            return self.clb & 0xFFFFFFFF
        if off == P_CLBU:
            return self.clb >> 32
        if off == P_FB:
            return self.fb & 0xFFFFFFFF
        if off == P_FBU:
            return self.fb >> 32
        return 0

    def write(self, off: int, value: int) -> None:
        if off == P_CI:
            if self.cmd & CMD_ST and value & ~self.ci:
                self.ci |= value
                self.issue()
        elif off == P_SACT:
            if self.cmd & CMD_ST:
                self.sact |= value
        elif off == P_IS:
            self.is_ &= ~value
            self.hba.update_irq()
        elif off == P_IE:
            self.ie = value & IE_MASK
            self.hba.update_irq()
        elif off == P_CMD:
            self._write_cmd(value)
        elif off == P_CLB:
            self.clb = (self.clb & ~0xFFFFFFFF) | (value & 0xFFFFFC00)
        elif off == P_CLBU:
            self.clb = (self.clb & 0xFFFFFFFF) | value << 32
        elif off == P_FB:
            self.fb = (self.fb & ~0xFFFFFFFF) | (value & 0xFFFFFF00)
        elif off == P_FBU:
            self.fb = (self.fb & 0xFFFFFFFF) | value << 32
        elif off == P_SERR:
            self.serr &= ~value
        elif off == P_SCTL:
            self._write_sctl(value & 0xFFF)

    def _write_cmd(self, value: int) -> None:
        old = self.cmd
        if value & CMD_CLO:                      # command list override: BSY and DRQ off
            self.tfd &= ~(BSY | DRQ)
        self.cmd = (old & ~CMD_WRITABLE) | (value & CMD_WRITABLE)
        if old & CMD_ST and not value & CMD_ST:
            self.stop()
        elif value & CMD_ST and not old & CMD_ST:
            self.halted = False

    def stop(self) -> None:
        """PxCMD.ST cleared: no DMA once PxCMD.CR reads 0, so the I/O in flight is waited
        for here (as a virtio reset does); PxCI and PxSACT clear."""
        self.forget()
        if self.io is not None:
            self.io.drain()
        self.ci = self.sact = 0
        self.ccs = 0
        self.tfd &= ~(BSY | DRQ)

    def _write_sctl(self, value: int) -> None:
        det, old = value & 0xF, self.sctl & 0xF
        self.sctl = value
        if det == 1 and old != 1:                # COMRESET starts: the device drops off
            self.stop()
            self.ssts = 0x001
            self.tfd = 0x7F | BSY
        elif det == 0 and old == 1:              # COMRESET ends: the device signs on
            self.comreset_done()
        elif det == 4:                           # offline: phy disabled
            self.stop()
            self.ssts = 0x004

    # -- FIS delivery (lock held) --------------------------------------------------------------
    def post_fis(self, offset: int, fis: bytes) -> None:
        """Copy a received FIS into the FIS receive area (when PxCMD.FRE is on)."""
        if not self.cmd & CMD_FRE:
            return
        try:
            self.hba.dma.write(self.fb + offset, fis)
        except GuestError as e:
            self.fatal(IS_HBFS, f"FIS receive area: {e}")

    def raise_is(self, bits: int) -> None:
        self.is_ |= bits
        self.hba.update_irq()

    def fatal(self, bits: int, why: str) -> None:
        """A fatal error: PxIS bits, and the port stops processing commands."""
        log.debug("%s port %d: %s", self.hba.name, self.index, why)
        self.halted = True
        self.raise_is(bits)

    # -- commands (a vCPU thread or the event loop) --------------------------------------------
    def issue(self) -> None:
        """Fetch and start the commands the driver issued; non-queued ones one at a time,
        and never next to queued ones (the ATA device would refuse the mix)."""
        try:
            self._issue()
        except Exception as e:           # a bug of ours: this controller stops, not the VMM
            self.hba.fault(f"{type(e).__name__}: {e}")

    def _issue(self) -> None:
        with self.hba.lock:
            io = self.io
            assert io is not None
            self.in_issue = True
            try:
                while self.cmd & CMD_ST and not self.halted and not self.nonq_busy:
                    new = self.ci & ~self.started
                    if not new:
                        break
                    slot = (new & -new).bit_length() - 1
                    self.started |= 1 << slot
                    self.ccs = slot
                    try:
                        cmd = self.fetch(slot)
                        if self.drive.is_queued(cmd):
                            self.drive.start_queued(cmd)
                        elif self.ncq_busy:
                            self.started &= ~(1 << slot)   # after the queued ones finish
                            break
                        else:
                            self.nonq_busy = True
                            self.tfd |= BSY
                            self.drive.execute(cmd)
                    except PortFatal as e:
                        self.fatal(e.bits, str(e))
                    except _Control as c:
                        self._control(slot, c.control)
            finally:
                self.in_issue = False
                loop = self.hba.loop
                if self.writes_queued and loop is not None and not loop.on_loop_thread:
                    loop.call_soon(self._submit, owner=self.hba)
                else:
                    io.submit()
                self.writes_queued = False

    def _submit(self) -> None:
        """io_submit of a batch with writes, on the loop: the kernel's synchronous part of an
        O_DIRECT write (timestamps, journal) would otherwise stall the vCPU that rang."""
        with self.hba.lock:
            if self.io is not None:
                self.io.submit()

    def _control(self, slot: int, control: int) -> None:
        """A Device Control FIS: SRST set holds the device in reset, SRST cleared brings it
        back with its signature; either way the command is done at once (what the R and C
        bits of Linux's and Windows' soft reset commands ask for)."""
        self.ci &= ~(1 << slot)
        self.started &= ~(1 << slot)
        if control & 0x04:
            self.in_srst = True
            self.tfd = 0x0100 | BSY
        elif self.in_srst:
            self.in_srst = False
            self.comreset_done()

    def fetch(self, slot: int) -> Command:
        dma = self.hba.dma
        try:
            dw0, _prdbc, ctba, ctbau = _HDR.unpack(dma.read(self.clb + 32 * slot, 16))
            cfl, prdtl = dw0 & 0x1F, dw0 >> 16
            if cfl < 5 or cfl > 16:
                raise PortFatal(IS_IFS, f"slot {slot}: command FIS of {cfl} dwords")
            if prdtl > MAX_PRDT:
                raise PortFatal(IS_IFS, f"slot {slot}: PRDT of {prdtl} entries (at most "
                                f"{MAX_PRDT})")
            table = (ctbau << 32) | (ctba & 0xFFFFFF80)
            head = dma.read(table, 0x80 + 16 * prdtl)
        except GuestError as e:
            raise PortFatal(IS_HBFS, f"slot {slot}: {e}") from None
        fis = head[:cfl * 4].ljust(20, b"\0")
        if fis[0] != FIS_H2D:
            raise PortFatal(IS_IFS, f"slot {slot}: FIS type {fis[0]:#x} is not H2D register")
        pieces, prd_irq = [], False
        for dba, dbau, _res, dbc in _PRD.iter_unpack(memoryview(head)[0x80:]):
            pieces.append(((dbau << 32) | (dba & ~1), (dbc & 0x3FFFFF) + 1))
            prd_irq |= dbc >> 31
        if not fis[1] & 0x80:
            raise _Control(fis[15])
        return Command(self, slot, fis, head[0x40:0x50], pieces, bool(prd_irq),
                       bool(dw0 & 1 << 6), bool(dw0 & 1 << 5))

    def set_prdbc(self, cmd: Command) -> None:
        try:
            self.hba.dma.write(self.clb + 32 * cmd.slot + 4, struct.pack("<I", cmd.nbytes))
        except GuestError as e:
            self.fatal(IS_HBFS, f"command header: {e}")

    def live(self, cmd: Command) -> bool:
        """Whether a completion still counts (no stop, reset or NCQ abort since the start)."""
        return cmd.gen == self.gen

    def complete(self, cmd: Command, status: int = DRDY | DSC, error: int = 0, *,
                 pio_in: bool = False, lba: int = 0, count: int = 0) -> None:
        """A non-queued command ended: the D2H Register FIS (or, after a successful PIO
        data-in, the PIO Setup FIS), PRDBC, PxCI, the interrupt; ERR means a task file error."""
        with self.hba.lock:
            if not self.live(cmd):
                return
            self.nonq_busy = False
            self.tfd = error << 8 | status
            self.set_prdbc(cmd)
            bits = IS_DPS if cmd.prd_irq else 0
            if pio_in and not status & ERR:
                self.post_fis(RX_PSFIS, _pio_setup(status, error, cmd.nbytes))
                bits |= IS_PSS
            else:
                self.post_fis(RX_RFIS, _d2h(status, error, lba, count))
                bits |= IS_DHRS
            if status & ERR:
                self.halted = True
                bits |= IS_TFES
            else:
                self.ci &= ~(1 << cmd.slot)
                self.started &= ~(1 << cmd.slot)
            self.raise_is(bits)
            if self.ci & ~self.started and not self.halted and not self.in_issue:
                self.hba.loop_call(self.issue)

    # -- NCQ -----------------------------------------------------------------------------------
    def queued(self, cmd: Command) -> bool:
        """Accept a queued command: PxCI clears at once (the device took it)."""
        bit = 1 << cmd.tag
        if self.ncq_busy & bit:
            return False
        self.ncq_busy |= bit
        self.ci &= ~(1 << cmd.slot)
        self.started &= ~(1 << cmd.slot)
        return True

    def ncq_done(self, cmd: Command) -> None:
        """A queued command succeeded: its bit goes out in the Set Device Bits FIS the block
        queue's ``batch_done`` sends (:meth:`flush_sdb`): the completions of one reap share
        one FIS and one interrupt. Off the loop thread it goes out at once."""
        with self.hba.lock:
            if not self.live(cmd):
                return
            self.ncq_busy &= ~(1 << cmd.tag)
            self.sdb_pending |= 1 << cmd.tag
            loop = self.hba.loop
            if loop is None or not loop.on_loop_thread:
                self._send_sdb(self.gen)
            if not self.ncq_busy and self.ci & ~self.started and not self.in_issue:
                self.hba.loop_call(self.issue)

    def flush_sdb(self) -> None:
        with self.hba.lock:
            if self.sdb_pending:
                self._send_sdb(self.gen)

    def _send_sdb(self, gen: int, status: int = DRDY | DSC, error: int = 0) -> None:
        with self.hba.lock:
            if gen != self.gen:
                return
            done, self.sdb_pending = self.sdb_pending, 0
            self.sact &= ~done
            self.tfd = error << 8 | (self.tfd & (BSY | DRQ)) | (status & 0x77)
            self.post_fis(RX_SDBFIS, struct.pack("<BBBBI", FIS_SDB, 0x40, status & 0x77,
                                                 error, done))
            self.raise_is(IS_SDBS | (IS_TFES if status & ERR else 0))

    def ncq_error(self, cmd: Command, error: int) -> None:
        """A queued command failed: the device aborts every queued command it holds and
        sends a Set Device Bits FIS with ERR (plus the tags that did complete); the HBA
        stops (TFES) until the driver restarts the port and reads log 10h."""
        with self.hba.lock:
            if not self.live(cmd):
                return
            pending = self.sdb_pending
            self.forget()                 # other tags' completions are dropped from now on
            self.sdb_pending = pending    # those already done still go out with the error
            self.halted = True
            self.drive.ncq_failed(cmd, error)
            self._send_sdb(self.gen, DRDY | DSC | ERR, error)


class _Control(Exception):
    """A command FIS with C = 0: a Device Control register update (SRST)."""

    def __init__(self, control: int) -> None:
        super().__init__("control")
        self.control = control


def _d2h(status: int, error: int, lba: int = 0, count: int = 0, irq: bool = True) -> bytes:
    """A D2H Register FIS (type, I bit, status, error, LBA, device, count)."""
    fis = bytearray(20)
    fis[0], fis[1], fis[2], fis[3] = FIS_D2H, 0x40 if irq else 0, status, error
    fis[4:7] = (lba & 0xFFFFFF).to_bytes(3, "little")
    fis[7] = 0xE0 if status != BSY else 0
    fis[8:11] = (lba >> 24 & 0xFFFFFF).to_bytes(3, "little")
    struct.pack_into("<H", fis, 12, count & 0xFFFF)
    return bytes(fis)


def _pio_setup(e_status: int, error: int, nbytes: int) -> bytes:
    fis = bytearray(20)
    fis[0], fis[1], fis[2], fis[3] = FIS_PIO_SETUP, 0x40 | 0x20, DRDY | DSC | DRQ, error
    fis[15] = e_status
    struct.pack_into("<H", fis, 16, min(nbytes, 0xFFFF))
    return bytes(fis)


class AhciHba(PciDevice):
    """The controller: ICH9 identity, ABAR in BAR 5, one MSI vector or INTA#."""

    vendor_id, device_id, class_code, revision = 0x8086, 0x2922, 0x010601, 0x02
    subsystem_vendor_id, subsystem_id = 0x8086, 0x2922
    interrupt_pin = 1
    msi_vectors = 1
    name = "ahci"

    def __init__(self, drives: list[Drive], workers: int = 8, name: str = "ahci") -> None:
        if not 1 <= len(drives) <= MAX_PORTS:
            raise ValueError(f"an AHCI controller has 1..{MAX_PORTS} ports")
        self.name = name
        size = 0x1000
        while size < PORT_BASE + PORT_SIZE * len(drives):
            size *= 2
        self.bars = [BarSpec(ABAR, size, BAR_MEM32)]
        self.lock = threading.RLock()
        self.workers = workers
        self.ports = [Port(self, i, d) for i, d in enumerate(drives)]
        for p in self.ports:
            p.drive.port = p
        n = len(drives)
        self.cap = (CAP_S64A | CAP_SNCQ | CAP_SCLO | CAP_SAM | ISS_GEN3 << 20
                    | (SLOTS - 1) << 8 | (n - 1))
        self.pi = (1 << n) - 1 if n < 32 else 0xFFFFFFFF
        self.ghc = GHC_AE
        self.is_ = 0
        self.level = False
        self.broken = False

    def realize(self) -> None:
        for p in self.ports:
            backend = p.drive.backend
            if backend is not None:
                p.io = BlockQueue(backend, self.loop, depth=SLOTS, workers=self.workers,
                                  owner=self, name=f"{self.name}.{p.index}",
                                  batch_done=p.flush_sdb)
            else:
                p.io = _NoMedium()

    def loop_call(self, fn, *args) -> None:
        loop = self.loop
        if loop is None:
            fn(*args)
        else:
            loop.call_soon(fn, *args, owner=self)

    # -- registers (vCPU threads) --------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        base = offset & ~3
        if size == 4 and base == offset:
            return self._read32(offset)
        value = self._read32(base) | self._read32(base + 4) << 32
        return value >> 8 * (offset - base) & ((1 << 8 * size) - 1)

    def _read32(self, off: int) -> int:
        with self.lock:
            if off >= PORT_BASE:
                i, reg = divmod(off - PORT_BASE, PORT_SIZE)
                return self.ports[i].read(reg) if i < len(self.ports) else 0
            if off == IS:
                return self.is_
            if off == GHC:
                return self.ghc
            if off == CAP:
                return self.cap
            if off == PI:
                return self.pi
            return VERSION if off == VS else 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        value &= (1 << 8 * size) - 1
        base = offset & ~3
        if size == 8 and base == offset:
            self._write32(offset, value & 0xFFFFFFFF, 0xFFFFFFFF)
            self._write32(offset + 4, value >> 32, 0xFFFFFFFF)
            return
        shift = 8 * (offset - base)
        mask = ((1 << 8 * size) - 1) << shift & 0xFFFFFFFF
        self._write32(base, value << shift & 0xFFFFFFFF, mask)

    def _write32(self, off: int, value: int, mask: int) -> None:
        with self.lock:
            if off >= PORT_BASE:
                i, reg = divmod(off - PORT_BASE, PORT_SIZE)
                if i >= len(self.ports):
                    return
                port = self.ports[i]
                if mask != 0xFFFFFFFF and reg not in W1_PORT:
                    value = (port.read(reg) & ~mask) | value
                port.write(reg, value)
            elif off == IS:
                self.is_ &= ~value
                self.update_irq()
            elif off == GHC:
                if mask != 0xFFFFFFFF:
                    value = (self.ghc & ~mask) | value
                if value & GHC_HR:
                    self.hba_reset()
                else:
                    self.ghc = GHC_AE | (value & GHC_IE)
                    self.update_irq()

    def update_irq(self) -> None:
        """IS follows the ports' enabled PxIS bits; MSI fires when a port's bit comes on
        (also when the driver clears IS while a port still has one), INTA# is a level."""
        pending = 0
        for p in self.ports:
            if p.is_ & p.ie:
                pending |= 1 << p.index
        new = pending & ~self.is_
        self.is_ |= pending
        irq = self.irq
        if irq is None:
            return
        level = bool(self.is_ and self.ghc & GHC_IE)
        if level:
            if new or not self.level and irq.mode == "intx":
                irq.trigger(0)
        elif self.level:
            irq.deassert()
        self.level = level

    # -- snapshots -----------------------------------------------------------------------------
    state_version = 1

    def _drain(self) -> None:
        """Finish every command in flight: the block I/O, then its completion on the loop
        (FIS, PRDBC, PxCI/PxSACT, the interrupt: all in guest RAM and registers), and any
        command that completion started in turn (one waiting behind NCQ commands)."""
        for _ in range(100):
            for p in self.ports:
                if p.io is not None and not p.io.drain(30):
                    raise VmrunError(f"{self.name}: port {p.index}: commands still in flight "
                                     "after 30 s")
            if self.loop is not None:
                self.loop.sync()
            with self.lock:
                if not any(getattr(p.io, "inflight", 0) or p.ncq_busy or p.nonq_busy
                           or p.sdb_pending for p in self.ports):
                    return
        raise VmrunError(f"{self.name}: commands keep coming while draining")

    def device_state(self) -> dict:
        """Drained and flushed first (:meth:`_drain`), so that nothing is in flight; then
        the HBA's and every port's registers and each drive's state (ATA: write cache,
        transfer mode, the NCQ error log; ATAPI: tray, lock, sense, unit attention, media
        event). Images are not copied: a restore needs the same files, unchanged."""
        self._drain()
        for p in self.ports:
            d = p.drive
            if d.backend is not None and not getattr(d, "read_only", True):
                d.backend.flush()
        with self.lock:
            return versioned(self.state_version, {
                "hba": [self.ghc, self.is_, self.level, self.broken],
                "ports": [[getattr(p, k) for k in Port.STATE] for p in self.ports],
                "drives": [list(plain_fields(p.drive, p.drive.config).items())
                           for p in self.ports]})

    def load_device_state(self, state: dict) -> None:
        """Registers back; commands the driver issued that were waiting are started."""
        f = check_version(self.name, state, self.state_version)
        if len(f["ports"]) != len(self.ports):
            raise ValueError(f"{self.name}: {len(f['ports'])} ports saved, {len(self.ports)} "
                             "here")
        with self.lock:
            self.ghc, self.is_, self.level, self.broken = f["hba"]
            for p, values, drive in zip(self.ports, f["ports"], f["drives"], strict=True):
                for k, v in zip(Port.STATE, values, strict=True):
                    setattr(p, k, v)
                load_fields(p.drive, dict(drive))
            if self.level and self.irq is not None and self.irq.mode == "intx":
                self.irq.trigger(0)
        for p in self.ports:
            if p.cmd & CMD_ST and p.ci & ~p.started and not p.halted:
                self.loop_call(p.issue)

    # -- resets --------------------------------------------------------------------------------
    def hba_reset(self) -> None:
        """GHC.HR: every register to its power-on value, every port through COMRESET."""
        with self.lock:
            for p in self.ports:
                p.stop()
                p.power_on()
            self.ghc = GHC_AE
            self.is_ = 0
            self.broken = False
            self.level = True               # lower INTA# whatever it was
            self.update_irq()

    def reset(self) -> None:
        self.hba_reset()

    def fault(self, reason: str) -> None:
        """A bug of ours in an event-loop callback: every port stops (HBFS) until GHC.HR."""
        log.error("%s: %s: ports stopped until the driver resets the controller", self.name,
                  reason)
        with self.lock:
            self.broken = True
            for p in self.ports:
                p.fatal(IS_HBFS, reason)

    def close(self) -> None:
        for p in self.ports:
            if p.io is not None:
                p.io.close()
                p.io = None
            p.drive.close()


class _NoMedium:
    """The block queue of a drive without an image (an empty CD drive)."""

    def submit(self) -> None:
        pass

    def drain(self, timeout: float = 60.0) -> bool:
        return True

    def close(self) -> None:
        pass
