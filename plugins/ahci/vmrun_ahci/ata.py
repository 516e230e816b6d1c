"""The ATA disk behind an AHCI port: IDENTIFY, DMA and NCQ reads and writes, FLUSH, TRIM.

Data moves through the platform's block queue (native AIO on an O_DIRECT image, worker
threads otherwise) straight between the PRDT's guest buffers and the image. NCQ commands
(READ/WRITE FPDMA QUEUED, 32 tags) complete in whatever order the host finishes them and are
reported in Set Device Bits FISes; a failed one aborts the rest, and READ LOG EXT page 10h
tells the driver which tag failed and why, as libata expects.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from typing import TYPE_CHECKING

from vmrun_ahci.hba import DRDY, DSC, ERR, IS_DPS, Command, PortFatal  # noqa: F401

if TYPE_CHECKING:
    from vmrun.api import BlockBackend
    from vmrun_ahci.hba import Port

# ATA error register bits
ABRT, IDNF, UNC = 0x04, 0x10, 0x40
OK = DRDY | DSC
FAIL = DRDY | DSC | ERR

READ_DMA, READ_DMA_EXT, WRITE_DMA, WRITE_DMA_EXT = 0xC8, 0x25, 0xCA, 0x35
READ_SECTORS, READ_SECTORS_EXT, WRITE_SECTORS, WRITE_SECTORS_EXT = 0x20, 0x24, 0x30, 0x34
READ_FPDMA, WRITE_FPDMA = 0x60, 0x61
READ_VERIFY, READ_VERIFY_EXT = 0x40, 0x42
FLUSH, FLUSH_EXT = 0xE7, 0xEA
IDENTIFY, IDENTIFY_PACKET = 0xEC, 0xA1
DSM, SET_FEATURES, READ_LOG_EXT, READ_LOG_DMA_EXT = 0x06, 0xEF, 0x2F, 0x47
SET_MULTIPLE, CHECK_POWER_MODE = 0xC6, 0xE5
NO_DATA_OK = (0xE0, 0xE1, 0xE2, 0xE3, 0x91, 0x10, 0xE6)   # standby/idle/sleep, legacy
SETF_OK = (0x02, 0x82, 0x03, 0x10, 0x90, 0x55, 0xAA, 0x66, 0xCC, 0x05, 0x85)

MAX_DSM_BLOCKS = 8          # 512-byte blocks of TRIM ranges per DATA SET MANAGEMENT
NCQ_DEPTH = 32
LOG_DIRECTORY, LOG_NCQ_ERROR = 0x00, 0x10


def ata_string(text: str, n: int) -> bytes:
    """An IDENTIFY string: ASCII, space-padded, each 16-bit word byte-swapped."""
    raw = text.encode("ascii", "replace")[:n].ljust(n, b" ")
    return bytes(raw[i ^ 1] for i in range(n))


def default_serial(seed: str) -> str:
    """A stable 20-character serial derived from the machine and the port (as bhyve does)."""
    h = hashlib.sha256(seed.encode()).hexdigest().upper()
    return f"VMRUN-{h[:4]}-{h[4:8]}-{h[8:12]}"[:20]


class Drive:
    """What a port needs from the device behind it (an ATA disk or an ATAPI CD)."""

    atapi = False
    reset_status = OK
    port: Port
    backend: BlockBackend | None = None

    #: Attributes that are configuration (the image's geometry, identity strings), not
    #: state a snapshot saves; a drive's other plain attributes are its state.
    config = ("serial", "model", "firmware", "atapi", "reset_status")

    def reset(self) -> None:
        """Device reset (COMRESET, SRST): forget volatile state."""

    def is_queued(self, cmd: Command) -> bool:
        return False

    def start_queued(self, cmd: Command) -> None:
        raise NotImplementedError

    def execute(self, cmd: Command) -> None:
        raise NotImplementedError

    def ncq_failed(self, cmd: Command, error: int) -> None:
        pass

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


class AtaDisk(Drive):
    """A SATA disk: LBA48, NCQ 32 deep, write cache, TRIM when the backend can discard."""

    config = (*Drive.config, "lss", "pss", "sectors", "read_only", "trim")

    def __init__(self, backend: BlockBackend, serial: str = "", model: str = "VMRUN SATA DISK",
                 firmware: str = "0.1") -> None:
        self.backend = backend
        self.lss = backend.logical_sector_size
        self.pss = backend.physical_sector_size
        self.sectors = backend.size // self.lss
        self.read_only = backend.read_only
        self.trim = backend.supports_discard and not backend.read_only
        self.serial, self.model, self.firmware = serial, model, firmware
        self.wce = True
        self.udma = 5
        self.ncq_log: bytes | None = None

    def reset(self) -> None:
        self.ncq_log = None

    # -- dispatch ------------------------------------------------------------------------------
    def is_queued(self, cmd: Command) -> bool:
        return cmd.command in (READ_FPDMA, WRITE_FPDMA)

    def start_queued(self, cmd: Command) -> None:
        port = self.port
        cmd.tag = cmd.count >> 3 & 0x1F
        if not port.queued(cmd):
            port.ncq_error(cmd, ABRT)          # a tag already in flight: overlapped command
            return
        if self.ncq_log is not None:           # still in the error state: refuse
            port.ncq_error(cmd, ABRT)
            return
        count = cmd.features or 65536
        fua = bool(cmd.device & 0x80)
        self._rw(cmd, cmd.lba, count, cmd.command == WRITE_FPDMA, fua, queued=True)

    def execute(self, cmd: Command) -> None:
        c = cmd.command
        port = self.port
        if c in (READ_DMA_EXT, READ_SECTORS_EXT, WRITE_DMA_EXT, WRITE_SECTORS_EXT):
            self._rw(cmd, cmd.lba, cmd.count or 65536, c in (WRITE_DMA_EXT, WRITE_SECTORS_EXT),
                     False, pio_in=c == READ_SECTORS_EXT)
        elif c in (READ_DMA, READ_SECTORS, WRITE_DMA, WRITE_SECTORS):
            lba, count = cmd.lba28
            self._rw(cmd, lba, count, c in (WRITE_DMA, WRITE_SECTORS), False,
                     pio_in=c == READ_SECTORS)
        elif c in (FLUSH, FLUSH_EXT):
            port.io.flush(self._done(cmd, write=True))
        elif c == IDENTIFY:
            self._data_in(cmd, self.identify(), pio=True)
        elif c == DSM:
            self._trim(cmd)
        elif c == SET_FEATURES:
            self._set_features(cmd)
        elif c in (READ_LOG_EXT, READ_LOG_DMA_EXT):
            self._read_log(cmd, pio=c == READ_LOG_EXT)
        elif c in (READ_VERIFY, READ_VERIFY_EXT):
            lba, count = (cmd.lba, cmd.count or 65536) if c == READ_VERIFY_EXT else cmd.lba28
            port.complete(cmd, *((OK, 0) if lba + count <= self.sectors else (FAIL, IDNF)))
        elif c == CHECK_POWER_MODE:
            port.complete(cmd, count=0xFF)
        elif c in NO_DATA_OK or c == SET_MULTIPLE:
            port.complete(cmd)
        else:                                  # IDENTIFY PACKET, PACKET, NOP, SMART, ...
            port.complete(cmd, FAIL, ABRT)

    # -- reads and writes ----------------------------------------------------------------------
    def _rw(self, cmd: Command, lba: int, count: int, write: bool, fua: bool, *,
            queued: bool = False, pio_in: bool = False) -> None:
        port = self.port
        fail = (lambda e: port.ncq_error(cmd, e)) if queued else \
            (lambda e: port.complete(cmd, FAIL, e, lba=lba))
        if lba + count > self.sectors:
            fail(IDNF)
            return
        if write and self.read_only:
            fail(ABRT)
            return
        try:
            sg = cmd.data(count * self.lss)
        except PortFatal as e:
            if queued:
                port.ncq_busy &= ~(1 << cmd.tag)
            raise e from None
        io = port.io
        flush = write and (fua or not self.wce)

        def done(result: int) -> None:
            if result < 0:
                fail(UNC if not write else ABRT)
            elif flush:
                io.flush(after_flush)
            elif queued:
                port.ncq_done(cmd)
            else:
                port.complete(cmd, pio_in=pio_in)

        def after_flush(result: int) -> None:
            if result < 0:
                fail(ABRT)
            elif queued:
                port.ncq_done(cmd)
            else:
                port.complete(cmd)

        if write:
            port.writes_queued = True
            io.write(lba * self.lss, sg, done)
        else:
            io.read(lba * self.lss, sg, done)

    def _done(self, cmd: Command, write: bool):
        port = self.port

        def done(result: int) -> None:
            if result < 0:
                port.complete(cmd, FAIL, ABRT if write or result == -errno.EROFS else UNC)
            else:
                port.complete(cmd)
        return done

    def _data_in(self, cmd: Command, data: bytes, pio: bool) -> None:
        sg = cmd.data(len(data))
        sg.writer().write(data)
        self.port.complete(cmd, pio_in=pio)

    # -- TRIM ----------------------------------------------------------------------------------
    def _trim(self, cmd: Command) -> None:
        port = self.port
        blocks = cmd.count
        if not cmd.features & 1 or not self.trim or not 1 <= blocks <= MAX_DSM_BLOCKS:
            port.complete(cmd, FAIL, ABRT)
            return
        payload = cmd.data(512 * blocks).reader().read(512 * blocks)
        ranges = []
        for (entry,) in struct.iter_unpack("<Q", payload):
            lba, n = entry & 0xFFFFFFFFFFFF, entry >> 48
            if not n:
                continue
            if lba + n > self.sectors:
                port.complete(cmd, FAIL, IDNF)
                return
            ranges.append((lba, n))
        if not ranges:
            port.complete(cmd)
            return
        left, worst = [len(ranges)], [0]

        def one(result: int) -> None:
            if result < 0 and not worst[0]:
                worst[0] = result
            left[0] -= 1
            if not left[0]:
                port.complete(cmd, *((FAIL, ABRT) if worst[0] else (OK, 0)))

        for lba, n in ranges:
            port.io.discard(lba * self.lss, n * self.lss, one)

    # -- SET FEATURES, logs --------------------------------------------------------------------
    def _set_features(self, cmd: Command) -> None:
        sub = cmd.features & 0xFF
        if sub not in SETF_OK:
            self.port.complete(cmd, FAIL, ABRT)
            return
        if sub == 0x02:
            self.wce = True
        elif sub == 0x82:
            self.wce = False
        elif sub == 0x03:
            mode = cmd.count & 0xFF
            if mode >> 3 == 8 and mode & 7 <= 6:
                self.udma = mode & 7
            elif mode >> 3 not in (0, 1, 4):     # PIO default, PIO flow control, MWDMA
                self.port.complete(cmd, FAIL, ABRT)
                return
        self.port.complete(cmd)

    def _read_log(self, cmd: Command, pio: bool) -> None:
        log_address, page, count = cmd.lba & 0xFF, cmd.lba >> 8 & 0xFFFF, cmd.count
        if log_address == LOG_DIRECTORY:
            pages = bytearray(512)
            struct.pack_into("<H", pages, 0, 1)
            struct.pack_into("<H", pages, 2 * LOG_NCQ_ERROR, 1)
        elif log_address == LOG_NCQ_ERROR:
            pages = bytearray(self.ncq_log or b"\x80".ljust(512, b"\0"))
            pages[511] = -sum(pages[:511]) & 0xFF
            self.ncq_log = None                 # reading it ends the NCQ error state
        else:
            pages = None
        if pages is None or page != 0 or count != 1:
            self.port.complete(cmd, FAIL, ABRT)
            return
        self._data_in(cmd, bytes(pages), pio)

    def ncq_failed(self, cmd: Command, error: int) -> None:
        log = bytearray(512)
        log[0] = cmd.tag
        log[2], log[3] = FAIL, error
        log[4:7] = (cmd.lba & 0xFFFFFF).to_bytes(3, "little")
        log[7] = cmd.device
        log[8:11] = (cmd.lba >> 24 & 0xFFFFFF).to_bytes(3, "little")
        struct.pack_into("<H", log, 12, cmd.features)
        self.ncq_log = bytes(log)

    # -- IDENTIFY DEVICE -----------------------------------------------------------------------
    def identify(self) -> bytes:
        w = [0] * 256
        sectors = self.sectors
        cyls = min(sectors // (16 * 63), 16383)
        w[0] = 0x0040                          # fixed, non-removable ATA device
        w[1], w[3], w[6] = cyls, 16, 63
        w[47] = 0x8010                         # READ/WRITE MULTIPLE: 16 sectors
        w[49] = 0x0F00                         # LBA, DMA, IORDY
        w[50] = 0x4000
        w[53] = 0x0007                         # words 54-58, 64-70 and 88 are valid
        w[54], w[55], w[56] = cyls, 16, 63
        chs = cyls * 16 * 63
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        w[59] = 0x0110
        lba28 = min(sectors, 0x0FFFFFFF)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[63] = 0x0007
        w[64] = 0x0003
        w[65] = w[66] = w[67] = w[68] = 120
        if self.trim:
            w[69] = 1 << 14 | 1 << 5           # deterministic, zeroed reads after TRIM
        w[75] = NCQ_DEPTH - 1
        w[76] = 1 << 8 | 1 << 3 | 1 << 2 | 1 << 1   # NCQ; SATA 1.5, 3.0 and 6.0 Gb/s
        w[80] = 0x01F0                         # ATA-4 .. ATA8-ACS
        w[82] = 1 << 14 | 1 << 5 | 1 << 3      # NOP, write cache, power management
        w[83] = 1 << 14 | 1 << 13 | 1 << 12 | 1 << 10   # FLUSH CACHE (EXT), LBA48
        w[84] = 1 << 14 | 1 << 5               # general purpose logging
        w[85] = 1 << 14 | (1 << 5 if self.wce else 0) | 1 << 3
        w[86] = 1 << 13 | 1 << 12 | 1 << 10
        w[87] = 1 << 14 | 1 << 5
        w[88] = 0x007F | 1 << (8 + self.udma)
        w[93] = 0
        for i in range(4):
            w[100 + i] = sectors >> (16 * i) & 0xFFFF
        ratio = self.pss // self.lss
        w[106] = 1 << 14 | ((1 << 13) | ratio.bit_length() - 1 if ratio > 1 else 0) | \
            (1 << 12 if self.lss > 512 else 0)
        if self.lss > 512:
            words = self.lss // 2
            w[117], w[118] = words & 0xFFFF, words >> 16
        w[119] = w[120] = 1 << 14
        if self.trim:
            w[105] = MAX_DSM_BLOCKS
            w[169] = 1
        w[209] = 1 << 14
        w[217] = 1                             # non-rotating medium (an SSD)
        w[222] = 0x101F
        raw = bytearray(struct.pack("<256H", *w))
        raw[20:40] = ata_string(self.serial, 20)
        raw[46:54] = ata_string(self.firmware, 8)
        raw[54:94] = ata_string(self.model, 40)
        raw[510] = 0xA5
        raw[511] = -sum(raw[:511]) & 0xFF
        return bytes(raw)
