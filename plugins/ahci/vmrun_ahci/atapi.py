"""The ATAPI CD/DVD drive behind an AHCI port: the MMC commands Linux's ``sr`` and
``isofs`` (and installers) use, on a read-only image with 2048-byte blocks.

A drive without an image is an empty drive (NOT READY, MEDIUM NOT PRESENT). START STOP UNIT
opens and closes the tray (refused while the medium is locked by PREVENT ALLOW MEDIUM
REMOVAL); closing it over the image is a medium change: the next command gets UNIT ATTENTION
(MEDIUM MAY HAVE CHANGED) and GET EVENT STATUS NOTIFICATION reports NEW MEDIA once.
Errors are CHECK CONDITION: status ERR, the sense key in the error register's high nibble,
and the full sense data for the REQUEST SENSE that follows.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vmrun_ahci.ata import ABRT, SET_FEATURES, Drive, ata_string
from vmrun_ahci.hba import DRDY, ERR, Command

if TYPE_CHECKING:
    from vmrun.api import BlockBackend

BLOCK = 2048
CD_MAX_BLOCKS = 404_849            # 90 minutes: anything bigger is a DVD
PACKET, IDENTIFY_PACKET, DEVICE_RESET = 0xA0, 0xA1, 0x08
OK_STATUS = DRDY
CHECK = DRDY | ERR

# sense keys, (ASC, ASCQ)
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, UNIT_ATTENTION = 0x0, 0x2, 0x3, 0x5, 0x6
NO_MEDIUM_CLOSED, NO_MEDIUM_OPEN = (0x3A, 0x01), (0x3A, 0x02)
INVALID_OPCODE, INVALID_FIELD, LBA_OUT_OF_RANGE = (0x20, 0x00), (0x24, 0x00), (0x21, 0x00)
MEDIUM_CHANGED, REMOVAL_PREVENTED = (0x28, 0x00), (0x53, 0x02)
READ_ERROR = (0x11, 0x00)

TEST_UNIT_READY, REQUEST_SENSE, INQUIRY, START_STOP, PREVENT_ALLOW = 0x00, 0x03, 0x12, 0x1B, 0x1E
READ_CAPACITY, READ_10, SEEK_10, READ_12, READ_CD = 0x25, 0x28, 0x2B, 0xA8, 0xBE
MODE_SENSE_6, MODE_SENSE_10, READ_TOC, GET_CONFIGURATION, GESN = 0x1A, 0x5A, 0x43, 0x46, 0x4A
READ_DISC_INFO, SET_CD_SPEED, MECHANISM_STATUS = 0x51, 0xBB, 0xBD
NEEDS_MEDIUM = (READ_CAPACITY, READ_10, READ_12, READ_CD, SEEK_10, READ_TOC, READ_DISC_INFO)
NO_ATTENTION = (INQUIRY, REQUEST_SENSE, GET_CONFIGURATION, GESN)

PROFILE_CDROM, PROFILE_DVDROM = 0x0008, 0x0010


class Sense(Exception):
    """CHECK CONDITION with this sense."""

    def __init__(self, key: int, code: tuple[int, int]) -> None:
        super().__init__(f"sense {key:x}/{code[0]:02x}/{code[1]:02x}")
        self.key, self.asc, self.ascq = key, code[0], code[1]


def msf(lba: int) -> bytes:
    lba += 150
    return bytes((0, lba // (75 * 60), lba // 75 % 60, lba % 75))


class AtapiCd(Drive):
    atapi = True
    reset_status = 0x00                  # a packet device comes out of reset without DRDY
    config = (*Drive.config, "blocks")   # the medium is the machine file's (same image)

    def __init__(self, backend: BlockBackend | None, serial: str = "",
                 model: str = "VMRUN SATA DVD-ROM", firmware: str = "0.1") -> None:
        self.image = backend
        self.backend = backend
        self.serial, self.model, self.firmware = serial, model, firmware
        self.blocks = backend.size // BLOCK if backend is not None else 0
        self.tray_open = False
        self.locked = False
        self.sense = (NO_SENSE, 0, 0)
        self.attention = False
        self.event = 0                     # GESN media event to report (2: new media)

    @property
    def medium(self) -> bool:
        return self.image is not None and not self.tray_open

    def reset(self) -> None:
        self.locked = False

    # -- ATA level -----------------------------------------------------------------------------
    def execute(self, cmd: Command) -> None:
        port = self.port
        c = cmd.command
        if c == PACKET:
            self._packet(cmd)
        elif c == IDENTIFY_PACKET:
            cmd.data(512).writer().write(self.identify())
            port.complete(cmd, OK_STATUS, pio_in=True)
        elif c == DEVICE_RESET:
            self.reset()
            port.complete(cmd, 0x00, 0, lba=0xEB1401)
        elif c in (SET_FEATURES, 0xE5, 0xE0, 0xE1, 0xE2, 0xE3):
            port.complete(cmd, OK_STATUS, count=0xFF if c == 0xE5 else 0)
        else:                              # IDENTIFY DEVICE and the rest: abort, signature
            port.complete(cmd, CHECK, ABRT, lba=0xEB1401, count=1)

    def _packet(self, cmd: Command) -> None:
        cdb = cmd.acmd
        op = cdb[0]
        try:
            if self.attention and op not in NO_ATTENTION:
                self.attention = False
                raise Sense(UNIT_ATTENTION, MEDIUM_CHANGED)
            if op in NEEDS_MEDIUM and not self.medium:
                raise Sense(NOT_READY, NO_MEDIUM_OPEN if self.tray_open else NO_MEDIUM_CLOSED)
            handler = self.COMMANDS.get(op)
            if handler is None:
                raise Sense(ILLEGAL_REQUEST, INVALID_OPCODE)
            handler(self, cmd, cdb)
        except Sense as s:
            self.sense = (s.key, s.asc, s.ascq)
            self.port.complete(cmd, CHECK, s.key << 4 | (ABRT if s.key == ILLEGAL_REQUEST
                                                         else 0))

    def _reply(self, cmd: Command, data: bytes, alloc: int) -> None:
        """Answer with at most ``alloc`` bytes (and at most what the PRDT holds)."""
        data = data[:alloc]
        sg = cmd.data(len(data), exact=False)
        sg.writer().write(data[:sg.nbytes])
        self._ok(cmd)

    def _ok(self, cmd: Command) -> None:
        self.sense = (NO_SENSE, 0, 0)
        self.port.complete(cmd, OK_STATUS)

    # -- commands ------------------------------------------------------------------------------
    def _test_unit_ready(self, cmd: Command, cdb: bytes) -> None:
        if not self.medium:
            raise Sense(NOT_READY, NO_MEDIUM_OPEN if self.tray_open else NO_MEDIUM_CLOSED)
        self._ok(cmd)

    def _request_sense(self, cmd: Command, cdb: bytes) -> None:
        key, asc, ascq = self.sense
        if key == NO_SENSE and not self.medium:
            key, (asc, ascq) = NOT_READY, NO_MEDIUM_OPEN if self.tray_open else NO_MEDIUM_CLOSED
        data = bytearray(18)
        data[0], data[2], data[7], data[12], data[13] = 0x70, key, 10, asc, ascq
        self.sense = (NO_SENSE, 0, 0)
        sg = cmd.data(min(18, cdb[4]), exact=False)
        sg.writer().write(bytes(data[:sg.nbytes]))
        self.port.complete(cmd, OK_STATUS)

    def _inquiry(self, cmd: Command, cdb: bytes) -> None:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        if cdb[1] & 1:
            page = cdb[2]
            if page == 0x00:
                data = bytes((0x05, 0, 0, 3, 0x00, 0x80, 0x83))
            elif page == 0x80:
                serial = self.serial.encode("ascii", "replace")
                data = bytes((0x05, 0x80, 0, len(serial))) + serial
            elif page == 0x83:
                ident = b"VMRUN   " + self.serial.encode("ascii", "replace")
                data = bytes((0x05, 0x83, 0, 4 + len(ident), 0x02, 0x01, 0, len(ident))) + ident
            else:
                raise Sense(ILLEGAL_REQUEST, INVALID_FIELD)
        else:
            data = bytes((0x05, 0x80, 0x00, 0x21, 31, 0, 0, 0)) + b"VMRUN   " + \
                self.model.removeprefix("VMRUN ").encode()[:16].ljust(16) + \
                self.firmware.encode()[:4].ljust(4)
        self._reply(cmd, data, alloc)

    def _start_stop(self, cmd: Command, cdb: bytes) -> None:
        start, loej = cdb[4] & 1, cdb[4] & 2
        if loej:
            if not start:
                if self.locked:
                    raise Sense(ILLEGAL_REQUEST, REMOVAL_PREVENTED)
                self.tray_open = True
                self.event = 3                  # media removal
            elif self.tray_open:
                self.tray_open = False
                if self.image is not None:
                    self.attention = True
                    self.event = 2              # new media
        self._ok(cmd)

    def _prevent_allow(self, cmd: Command, cdb: bytes) -> None:
        self.locked = bool(cdb[4] & 1)
        self._ok(cmd)

    def _read_capacity(self, cmd: Command, cdb: bytes) -> None:
        self._reply(cmd, struct.pack(">II", max(self.blocks - 1, 0), BLOCK), 8)

    def _read(self, cmd: Command, lba: int, count: int) -> None:
        if lba + count > self.blocks:
            raise Sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
        if not count:
            self._ok(cmd)
            return
        sg = cmd.data(count * BLOCK)
        port = self.port

        def done(result: int) -> None:
            if result < 0:
                self.sense = (MEDIUM_ERROR, *READ_ERROR)
                port.complete(cmd, CHECK, MEDIUM_ERROR << 4)
            else:
                self.sense = (NO_SENSE, 0, 0)
                port.complete(cmd, OK_STATUS)

        port.io.read(lba * BLOCK, sg, done)

    def _read_10(self, cmd: Command, cdb: bytes) -> None:
        lba, count = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        self._read(cmd, lba, count)

    def _read_12(self, cmd: Command, cdb: bytes) -> None:
        lba, count = struct.unpack_from(">II", cdb, 2)
        self._read(cmd, lba, count)

    def _read_cd(self, cmd: Command, cdb: bytes) -> None:
        """READ CD of user data only (2048 bytes a block): what data readers ask for."""
        if cdb[9] & 0xF8 != 0x10 or cdb[1] >> 2 & 7 not in (0, 2):
            raise Sense(ILLEGAL_REQUEST, INVALID_FIELD)
        lba = struct.unpack_from(">I", cdb, 2)[0]
        count = int.from_bytes(cdb[6:9], "big")
        self._read(cmd, lba, count)

    def _seek(self, cmd: Command, cdb: bytes) -> None:
        if struct.unpack_from(">I", cdb, 2)[0] >= self.blocks:
            raise Sense(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
        self._ok(cmd)

    def _mode_pages(self, page: int) -> bytes:
        caps = bytearray(28)
        caps[0], caps[1] = 0x2A, 26
        caps[2] = 0x03 if self.is_dvd else 0x00   # reads CD-R/RW media
        caps[4] = 0x71                         # audio play, mode 2 form 1/2, multi-session
        caps[5] = 0x60
        caps[6] = 0x29 | (0x02 if self.locked else 0)   # lock, eject, tray loader
        struct.pack_into(">HHHH", caps, 8, 706, 256, 512, 706)
        recovery = bytes((0x01, 0x06, 0, 5, 0, 0, 0, 0))
        pages = {0x01: recovery, 0x2A: bytes(caps)}
        if page == 0x3F:
            return recovery + bytes(caps)
        if page not in pages:
            raise Sense(ILLEGAL_REQUEST, INVALID_FIELD)
        return pages[page]

    def _mode_sense_10(self, cmd: Command, cdb: bytes) -> None:
        if cdb[2] >> 6 == 3:                    # saved values
            raise Sense(ILLEGAL_REQUEST, (0x39, 0x00))
        body = self._mode_pages(cdb[2] & 0x3F)
        data = struct.pack(">HBBxxH", len(body) + 6, 0x70 if not self.medium else 0, 0, 0)
        self._reply(cmd, data + body, struct.unpack_from(">H", cdb, 7)[0])

    def _mode_sense_6(self, cmd: Command, cdb: bytes) -> None:
        if cdb[2] >> 6 == 3:
            raise Sense(ILLEGAL_REQUEST, (0x39, 0x00))
        body = self._mode_pages(cdb[2] & 0x3F)
        self._reply(cmd, bytes((len(body) + 3, 0, 0, 0)) + body, cdb[4])

    def _read_toc(self, cmd: Command, cdb: bytes) -> None:
        as_msf = bool(cdb[1] & 2)
        fmt = cdb[2] & 0x0F or cdb[9] >> 6      # SFF-8020 drivers put the format in byte 9
        alloc = struct.unpack_from(">H", cdb, 7)[0]

        def address(lba: int) -> bytes:
            return msf(lba) if as_msf else struct.pack(">I", lba)

        if fmt == 0:
            start = cdb[6]
            if start > 1 and start != 0xAA:
                raise Sense(ILLEGAL_REQUEST, INVALID_FIELD)
            tracks = b""
            if start <= 1:
                tracks += bytes((0, 0x14, 1, 0)) + address(0)
            tracks += bytes((0, 0x16, 0xAA, 0)) + address(self.blocks)
            data = struct.pack(">HBB", len(tracks) + 2, 1, 1) + tracks
        elif fmt == 1:                          # session info: one session, track 1 at 0
            data = struct.pack(">HBB", 10, 1, 1) + bytes((0, 0x14, 1, 0)) + address(0)
        else:
            raise Sense(ILLEGAL_REQUEST, INVALID_FIELD)
        self._reply(cmd, data, alloc)

    @property
    def is_dvd(self) -> bool:
        return self.blocks > CD_MAX_BLOCKS

    def _get_configuration(self, cmd: Command, cdb: bytes) -> None:
        rt, start = cdb[1] & 3, struct.unpack_from(">H", cdb, 2)[0]
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        current = (PROFILE_DVDROM if self.is_dvd else PROFILE_CDROM) if self.medium else 0
        features = [
            (0x0000, 0x03, struct.pack(">HBxHBx", PROFILE_DVDROM, current == PROFILE_DVDROM,
                                       PROFILE_CDROM, current == PROFILE_CDROM)),
            (0x0001, 0x0B, struct.pack(">IBxxx", 2, 1)),     # core: ATAPI, DBE
            (0x0002, 0x07, bytes((0, 0, 0, 0))),              # morphing
            (0x0003, 0x0B, bytes((0x29 | (0x04 if self.tray_open else 0), 0, 0, 0))),
            (0x0010, 0x01, struct.pack(">IHBx", BLOCK, 1, 0)),  # random readable
            (0x001E, 0x0B, bytes((0, 0, 0, 0))),              # CD read
            (0x001F, 0x03, bytes((0, 0, 0, 0))),              # DVD read
        ]
        out = b""
        for code, flags, body in features:
            if code < start or rt == 2 and code != start:
                continue
            is_current = flags & 1 and (code in (0x0000, 0x0001, 0x0002, 0x0003) or
                                        self.medium)
            if rt == 1 and not is_current:
                continue
            out += struct.pack(">HBB", code, flags & ~1 | is_current, len(body)) + body
        data = struct.pack(">IxxH", len(out) + 4, current) + out
        self._reply(cmd, data, alloc)

    def _gesn(self, cmd: Command, cdb: bytes) -> None:
        if not cdb[1] & 1:                      # asynchronous notification: not offered
            raise Sense(ILLEGAL_REQUEST, INVALID_FIELD)
        alloc = struct.unpack_from(">H", cdb, 7)[0]
        if cdb[4] & 0x10:
            status = (1 if self.tray_open else 0) | (2 if self.medium else 0)
            event, self.event = self.event, 0
            data = struct.pack(">HBB", 6, 4, 0x10) + bytes((event, status, 0, 0))
        else:
            data = struct.pack(">HBB", 2, 0x80, 0x10)
        self._reply(cmd, data, alloc)

    def _read_disc_info(self, cmd: Command, cdb: bytes) -> None:
        data = bytearray(34)
        struct.pack_into(">H", data, 0, 32)
        data[2] = 0x0E                          # complete disc, last session complete
        data[3], data[4], data[5], data[6] = 1, 1, 1, 1
        data[7] = 0x20                          # unrestricted use
        data[8] = 0x00                          # CD-DA or CD-ROM
        struct.pack_into(">II", data, 16, 0xFFFFFFFF, 0xFFFFFFFF)
        self._reply(cmd, bytes(data), struct.unpack_from(">H", cdb, 7)[0])

    def _no_op(self, cmd: Command, cdb: bytes) -> None:
        self._ok(cmd)

    COMMANDS = {
        TEST_UNIT_READY: _test_unit_ready, REQUEST_SENSE: _request_sense, INQUIRY: _inquiry,
        START_STOP: _start_stop, PREVENT_ALLOW: _prevent_allow, READ_CAPACITY: _read_capacity,
        READ_10: _read_10, READ_12: _read_12, READ_CD: _read_cd, SEEK_10: _seek,
        MODE_SENSE_6: _mode_sense_6, MODE_SENSE_10: _mode_sense_10, READ_TOC: _read_toc,
        GET_CONFIGURATION: _get_configuration, GESN: _gesn, READ_DISC_INFO: _read_disc_info,
        SET_CD_SPEED: _no_op,
    }

    # -- IDENTIFY PACKET DEVICE ----------------------------------------------------------------
    def identify(self) -> bytes:
        w = [0] * 256
        w[0] = 0x8000 | 0x05 << 8 | 1 << 7      # ATAPI, CD-ROM, removable, 12-byte packets
        w[49] = 0x0F00                          # LBA, DMA, IORDY
        w[53] = 0x0006
        w[63] = 0x0007
        w[64] = 0x0003
        w[65] = w[66] = w[67] = w[68] = 120
        w[71], w[72] = 30, 30
        w[76] = 1 << 3 | 1 << 2 | 1 << 1
        w[80] = 0x01F0
        w[82] = 1 << 14 | 1 << 9 | 1 << 4       # NOP, DEVICE RESET, PACKET
        w[83] = w[84] = w[87] = 1 << 14
        w[85] = 1 << 14 | 1 << 9 | 1 << 4
        w[88] = 0x007F | 1 << 13
        w[222] = 0x101F
        raw = bytearray(struct.pack("<256H", *w))
        raw[20:40] = ata_string(self.serial, 20)
        raw[46:54] = ata_string(self.firmware, 8)
        raw[54:94] = ata_string(self.model, 40)
        raw[510] = 0xA5
        raw[511] = -sum(raw[:511]) & 0xFF
        return bytes(raw)
