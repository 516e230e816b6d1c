"""The 82545EM's EEPROM: 64 words of a 93C46 Microwire part, read bit by bit through EECD
(Linux's e1000 does that) or a word at a time through EERD (Windows' driver may).

Layout (8254x SDM, 5.6): words 0-2 the MAC address, 0x08-0x09 the PBA number, 0x0A/0x0F
initialization control 1/2, 0x0B-0x0E subsystem id/vendor and device id/vendor, 0x24
initialization control 3; word 0x3F makes the sum of all 64 words 0xBABA.
"""

from __future__ import annotations

from vmrun_e1000.regs import (
    EECD_CS,
    EECD_DI,
    EECD_DO,
    EECD_FWE,
    EECD_GNT,
    EECD_PRES,
    EECD_REQ,
    EECD_SK,
)

WORDS = 64
ADDR_BITS = 6                # 64 words: EECD.SIZE reads 0
OPCODE_BITS = 3
OPCODE_READ = 0b110          # start bit 1, then READ (10)
CHECKSUM_WORD = 0x3F
CHECKSUM = 0xBABA


def contents(mac: bytes, device_id: int, subsystem_id: int, subsystem_vendor: int) -> list[int]:
    """The 64 words, with the checksum word filled in."""
    w = [0xFFFF] * WORDS
    for i in range(3):
        w[i] = mac[2 * i] | mac[2 * i + 1] << 8
    w[0x03:0x08] = [0x0000, 0xFFFF, 0x0000, 0x0000, 0x0000]   # compat, LED (default), rsvd
    w[0x08], w[0x09] = 0x3000, 0x1000      # PBA number
    w[0x0A] = 0x6403                       # init control 1
    w[0x0B], w[0x0C] = subsystem_id, subsystem_vendor
    w[0x0D], w[0x0E] = device_id, 0x8086
    w[0x0F] = 0x3040                       # init control 2: symmetric and asymmetric PAUSE
    w[0x10:0x16] = [0x0008, 0x2000, 0x7E14, 0x0048, 0x1000, 0x00D8]
    w[0x16:0x20] = [0x0000, 0x2700, 0x6CC9, 0x3150, 0x0722, 0x040B, 0x0984, 0x0000,
                    0xC000, 0x0706]
    w[0x20:0x25] = [0x1008, 0x0000, 0x0F04, 0x7FFF, 0x4D01]   # 0x24: init control 3
    w[0x30:0x33] = [0x0100, 0x4000, 0x121C]
    w[CHECKSUM_WORD] = (CHECKSUM - sum(w[:CHECKSUM_WORD])) & 0xFFFF
    return w


class Microwire:
    """The serial side of EECD: SK (clock), CS (select), DI (to the EEPROM), DO (from it).

    A command is clocked in MSB first on rising SK edges while CS is high: the start bit and
    opcode (3 bits), then the word address (6 bits). After a READ the EEPROM drives a dummy 0,
    then the addressed word MSB first on the following rising edges, and goes on with the next
    words while CS stays high (sequential read). Writes and erases are accepted and ignored
    (the contents are fixed). Dropping CS ends the command.
    """

    def __init__(self, words: list[int]) -> None:
        self.words = words
        self.reset()

    def reset(self) -> None:
        self.latched = 0          # SK, CS, DI, FWE, REQ as last written
        self._idle()

    def _idle(self) -> None:
        self.bits_in = 0
        self.shift = 0
        self.reading = False
        self.addr = 0
        self.out_bit = 0          # bits driven since the dummy 0
        self.do = 1               # DO idles high (ready)

    def write(self, value: int) -> None:
        old = self.latched
        self.latched = value & (EECD_SK | EECD_CS | EECD_DI | EECD_FWE | EECD_REQ)
        if not value & EECD_CS:
            self._idle()
            return
        if not old & EECD_CS:     # CS rising: a new command starts
            self._idle()
        if not (value & EECD_SK and not old & EECD_SK):
            return                # only rising clock edges move data
        if self.reading:
            word = self.words[(self.addr + self.out_bit // 16) % WORDS]
            self.do = word >> (15 - self.out_bit % 16) & 1
            self.out_bit += 1
            return
        self.shift = (self.shift << 1 | bool(value & EECD_DI)) & 0x1FF
        self.bits_in += 1
        if self.bits_in == OPCODE_BITS + ADDR_BITS:
            if self.shift >> ADDR_BITS == OPCODE_READ:
                self.reading = True
                self.addr = self.shift & (WORDS - 1)
                self.out_bit = 0
                self.do = 0       # the dummy zero before the data
            # other opcodes (write, erase, EWEN...): ignored; wait for CS to drop

    def read(self) -> int:
        """EECD as the driver reads it: what it wrote, DO, present, and the grant."""
        v = self.latched | EECD_PRES
        if self.latched & EECD_REQ:
            v |= EECD_GNT
        if self.do:
            v |= EECD_DO
        return v
