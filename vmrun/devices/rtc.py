"""The PC real-time clock and CMOS RAM (Motorola MC146818A register set) at ports 0x70/0x71.

Offset 0 is the index port (bit 7, NMI disable, is ignored: there is no NMI source to mask);
offset 1 reads or writes the indexed byte of the 128-byte CMOS.

Why it is shaped this way:

* The clock is not a counter ticking in the device: the time registers are computed from the
  host clock on every read (UTC or local time), so the guest never drifts and nothing needs a
  thread to keep time. Guest writes set an offset to the host clock, so ``hwclock -w`` works;
  while register B.SET is on, the time registers are a frozen copy the guest edits, committed
  when SET is cleared (updates are inhibited meanwhile, as on the chip).
* Flags are computed lazily: register C (and ``tick``) look at which second boundaries and
  periodic-rate edges passed since the last look, and set UF, AF (alarm with "don't care"
  values 0xC0-0xFF) and PF. A guest that polls register C needs no timer at all; one that
  wants interrupts needs someone to call ``tick`` at ``next_deadline()``.
* IRQ 8 is modelled as the chip's IRQ pin: high while register C.IRQF is set, lowered by the
  read of register C that clears it.
* UIP (register A bit 7) is set for the 244 microseconds before each update, which is all a
  guest can observe of the update cycle.
* Register A's divider bits and register B.DSE are stored but not modelled: time always runs,
  and local time already includes daylight saving from the host.
* The memory-size bytes are what a PC BIOS leaves for the OS (base, extended, above 16 MiB,
  above 4 GiB), with the standard checksum over 0x10-0x2D at 0x2E/0x2F.
"""

from __future__ import annotations

import calendar
import math
import threading
import time
from collections.abc import Callable

from vmrun.core import layout
from vmrun.core.devstate import PlainState
from vmrun.core.irq import IrqLine

# Register indexes.
RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32

REG_A_UIP = 0x80
REG_A_DV = 0x70
REG_A_RS = 0x0F
REG_A_DEFAULT = 0x26          # 32.768 kHz time base, 1024 Hz periodic rate

REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM = 0x04               # 1 = binary, 0 = BCD
REG_B_24H = 0x02              # 1 = 24-hour, 0 = 12-hour (hours bit 7 = PM)
REG_B_DSE = 0x01

REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10

REG_D_VRT = 0x80

ALARM_DONT_CARE = 0xC0        # an alarm byte with both top bits set matches any value
HOUR_PM = 0x80
UIP_WINDOW = 244e-6           # seconds before an update during which UIP reads 1

# CMOS bytes a PC BIOS fills in.
CMOS_BASE_MEM_LO, CMOS_BASE_MEM_HI = 0x15, 0x16
CMOS_EXT_MEM_LO, CMOS_EXT_MEM_HI = 0x17, 0x18
CMOS_CHECKSUM_HI, CMOS_CHECKSUM_LO = 0x2E, 0x2F
CMOS_EXT_MEM2_LO, CMOS_EXT_MEM2_HI = 0x30, 0x31
CMOS_MEM_16M_LO, CMOS_MEM_16M_HI = 0x34, 0x35
CMOS_MEM_4G = 0x5B            # three bytes, 0x5B..0x5D, 64 KiB units

# Periodic interrupt rate in Hz for each rate-select value (32.768 kHz time base); RS=0: none.
# All are powers of two, so edge arithmetic on float seconds is exact.
_RATES = (0, 256, 128) + tuple(65536 >> rs for rs in range(3, 16))
_TIME_INDEXES = frozenset((RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK,
                           RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR, RTC_CENTURY))

# Decoded time: [second, minute, hour (0-23), weekday (1 = Sunday), day, month, year].
_SEC, _MIN, _HOUR, _WDAY, _MDAY, _MON, _YEAR = range(7)
_FIELD_OF_INDEX = {RTC_SECONDS: _SEC, RTC_MINUTES: _MIN, RTC_HOURS: _HOUR,
                   RTC_DAY_OF_WEEK: _WDAY, RTC_DAY_OF_MONTH: _MDAY, RTC_MONTH: _MON}


class CmosRtc(PlainState):
    """MC146818A RTC + CMOS RAM, two ports (index, data); ``irq`` is IRQ 8."""

    def __init__(self, irq: IrqLine, utc: bool = True, clock: Callable[[], float] = time.time,
                 memory_bytes: int = 0) -> None:
        self._irq = irq
        self._utc = utc
        self._clock = clock
        self._lock = threading.Lock()
        self._cmos = bytearray(128)
        self._index = 0
        self._offset = 0.0                 # guest time = clock() + offset
        self._reg_a = REG_A_DEFAULT
        self._reg_b = REG_B_24H
        self._flags = 0                    # register C's PF, AF, UF
        self._frozen: list[int] | None = None   # the time registers while SET is on
        self._last = clock()               # when flags were last brought up to date
        self._level = False
        self._fill_memory_size(memory_bytes)

    # -- bus device ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        # Byte-wide ports: a wider access is split into byte cycles (ISA); the index port is
        # write-only and reads as all ones.
        value = (1 << (8 * size)) - 1
        if offset <= 1 < offset + size:
            shift = 8 * (1 - offset)
            with self._lock:
                byte = self._read_register(self._index)
            value &= ~(0xFF << shift)
            value |= byte << shift
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                port = offset + i
                if port == 0:
                    self._index = (value >> (8 * i)) & 0x7F
                elif port == 1:
                    self._write_register(self._index, (value >> (8 * i)) & 0xFF)

    # -- timer side ------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Bring the update/alarm/periodic flags up to ``now`` (a ``clock()`` value)."""
        with self._lock:
            self._advance(now)
            self._update_irq()

    def next_deadline(self) -> float | None:
        """When (in ``clock()`` time) ``tick`` next has an enabled interrupt to deliver."""
        with self._lock:
            b = self._reg_b
            if b & REG_B_SET or not b & (REG_B_UIE | REG_B_AIE | REG_B_PIE):
                return None
            offset = self._offset
            g = self._clock() + offset
            deadline = math.inf
            if b & (REG_B_UIE | REG_B_AIE):
                deadline = math.floor(g) + 1 - offset
            hz = _RATES[self._reg_a & REG_A_RS]
            if b & REG_B_PIE and hz:
                deadline = min(deadline, (math.floor(g * hz) + 1) / hz - offset)
            return None if deadline == math.inf else deadline

    # -- registers -------------------------------------------------------------------------
    def _read_register(self, index: int) -> int:
        if index in _TIME_INDEXES:
            fields = self._frozen if self._frozen is not None else self._now_fields()
            return self._encode(index, fields)
        if index == RTC_REG_A:
            return self._reg_a | (REG_A_UIP if self._update_in_progress() else 0)
        if index == RTC_REG_B:
            return self._reg_b
        if index == RTC_REG_C:
            self._advance(self._clock())
            value = self._flags | (REG_C_IRQF if self._irqf() else 0)
            self._flags = 0
            self._update_irq()
            return value
        if index == RTC_REG_D:
            return REG_D_VRT
        return self._cmos[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in _TIME_INDEXES:
            if self._frozen is not None:
                self._decode_into(self._frozen, index, value)
            else:
                now = self._clock()
                fields = self._now_fields(now)
                self._decode_into(fields, index, value)
                self._commit(fields, now)
        elif index == RTC_REG_A:
            self._advance(self._clock())     # edges so far count at the old rate
            self._reg_a = value & ~REG_A_UIP
            self._update_irq()
        elif index == RTC_REG_B:
            self._write_reg_b(value)
        elif index in (RTC_REG_C, RTC_REG_D):
            pass                             # read-only
        else:
            self._cmos[index] = value        # alarm bytes and plain CMOS RAM

    def _write_reg_b(self, value: int) -> None:
        now = self._clock()
        old = self._reg_b
        if value & REG_B_SET:
            value &= ~REG_B_UIE              # setting SET clears UIE
            if not old & REG_B_SET:
                self._advance(now)
                self._frozen = self._now_fields(now)
        elif old & REG_B_SET:
            frozen = self._frozen
            self._frozen = None
            if frozen is not None:
                self._commit(frozen, now)
            self._last = now                 # no update was missed while SET was on
        self._reg_b = value
        self._update_irq()

    # -- time ----------------------------------------------------------------------------------
    def _now_fields(self, now: float | None = None) -> list[int]:
        g = (self._clock() if now is None else now) + self._offset
        return self._fields_at(math.floor(g))

    def _fields_at(self, second: int) -> list[int]:
        try:
            tm = time.gmtime(second) if self._utc else time.localtime(second)
        except (OverflowError, OSError, ValueError):
            tm = time.gmtime(0)
        # tm_wday: Monday = 0; the RTC counts Sunday = 1.
        return [tm.tm_sec, tm.tm_min, tm.tm_hour, (tm.tm_wday + 1) % 7 + 1, tm.tm_mday,
                tm.tm_mon, tm.tm_year]

    def _commit(self, fields: list[int], now: float) -> None:
        """Make ``fields`` the current guest time (keeping the sub-second phase)."""
        sec, minute, hour, _, mday, mon, year = fields
        if not (0 <= sec < 60 and 0 <= minute < 60 and 0 <= hour < 24 and 1 <= mon <= 12
                and 1 <= year <= 9999 and 1 <= mday <= calendar.monthrange(year, mon)[1]):
            return                           # not a time: the clock keeps running as it was
        wall = (year, mon, mday, hour, minute, sec)
        try:
            if self._utc:
                epoch = calendar.timegm(wall)
            else:
                epoch = time.mktime(wall + (0, 0, -1))
        except (OverflowError, ValueError):
            return
        g = now + self._offset
        self._offset = epoch + (g - math.floor(g)) - now
        self._last = now

    def _update_in_progress(self) -> bool:
        if self._reg_b & REG_B_SET:
            return False
        g = self._clock() + self._offset
        return g - math.floor(g) >= 1.0 - UIP_WINDOW

    def _encode(self, index: int, fields: list[int]) -> int:
        binary = self._reg_b & REG_B_DM
        if index == RTC_HOURS:
            hour = fields[_HOUR]
            if self._reg_b & REG_B_24H:
                return _to_reg(hour, binary)
            return _to_reg(hour % 12 or 12, binary) | (HOUR_PM if hour >= 12 else 0)
        if index == RTC_YEAR:
            return _to_reg(fields[_YEAR] % 100, binary)
        if index == RTC_CENTURY:
            return _to_reg(fields[_YEAR] // 100 % 100, binary)
        return _to_reg(fields[_FIELD_OF_INDEX[index]], binary)

    def _decode_into(self, fields: list[int], index: int, value: int) -> None:
        binary = self._reg_b & REG_B_DM
        if index == RTC_HOURS:
            if self._reg_b & REG_B_24H:
                fields[_HOUR] = _from_reg(value, binary)
            else:
                fields[_HOUR] = (_from_reg(value & ~HOUR_PM, binary) % 12
                                 + (12 if value & HOUR_PM else 0))
        elif index == RTC_YEAR:
            fields[_YEAR] = fields[_YEAR] // 100 * 100 + _from_reg(value, binary) % 100
        elif index == RTC_CENTURY:
            fields[_YEAR] = _from_reg(value, binary) * 100 + fields[_YEAR] % 100
        else:
            fields[_FIELD_OF_INDEX[index]] = _from_reg(value, binary)

    # -- interrupts ----------------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        """Set UF/AF/PF for the update cycles and periodic edges since the last look."""
        last = self._last
        self._last = now
        if now <= last or self._reg_b & REG_B_SET:
            return
        g0 = last + self._offset
        g1 = now + self._offset
        s0, s1 = math.floor(g0), math.floor(g1)
        if s1 > s0:
            self._flags |= REG_C_UF
            # Alarm: compare at each update that happened (the last few if time jumped).
            for second in range(max(s0 + 1, s1 - 7), s1 + 1):
                if self._alarm_matches(second):
                    self._flags |= REG_C_AF
                    break
        hz = _RATES[self._reg_a & REG_A_RS]
        if hz and math.floor(g1 * hz) > math.floor(g0 * hz):
            self._flags |= REG_C_PF

    def _alarm_matches(self, second: int) -> bool:
        fields = self._fields_at(second)
        cmos = self._cmos
        for index, alarm in ((RTC_SECONDS, RTC_SECONDS_ALARM), (RTC_MINUTES, RTC_MINUTES_ALARM),
                             (RTC_HOURS, RTC_HOURS_ALARM)):
            want = cmos[alarm]
            if want & ALARM_DONT_CARE != ALARM_DONT_CARE and want != self._encode(index, fields):
                return False
        return True

    def _irqf(self) -> bool:
        f, b = self._flags, self._reg_b
        return bool((f & REG_C_PF and b & REG_B_PIE) or (f & REG_C_AF and b & REG_B_AIE)
                    or (f & REG_C_UF and b & REG_B_UIE))

    def _update_irq(self) -> None:
        level = self._irqf()
        if level != self._level:
            self._level = level
            self._irq.set_level(level)

    # -- CMOS contents ------------------------------------------------------------------------
    def _fill_memory_size(self, memory_bytes: int) -> None:
        cmos = self._cmos
        if memory_bytes <= 0:
            return
        low = min(memory_bytes, layout.LOW_RAM_END)
        high = memory_bytes - low
        base_kib = min(640, memory_bytes // layout.KiB)
        ext_kib = min(max(low - layout.MiB, 0) // layout.KiB, 0xFFFF)
        above_16m = min(max(low - 16 * layout.MiB, 0) // (64 * layout.KiB), 0xFFFF)
        above_4g = min(high // (64 * layout.KiB), 0xFFFFFF)
        cmos[CMOS_BASE_MEM_LO:CMOS_BASE_MEM_HI + 1] = base_kib.to_bytes(2, "little")
        cmos[CMOS_EXT_MEM_LO:CMOS_EXT_MEM_HI + 1] = ext_kib.to_bytes(2, "little")
        cmos[CMOS_EXT_MEM2_LO:CMOS_EXT_MEM2_HI + 1] = ext_kib.to_bytes(2, "little")
        cmos[CMOS_MEM_16M_LO:CMOS_MEM_16M_HI + 1] = above_16m.to_bytes(2, "little")
        cmos[CMOS_MEM_4G:CMOS_MEM_4G + 3] = above_4g.to_bytes(3, "little")
        checksum = sum(cmos[0x10:0x2E])
        cmos[CMOS_CHECKSUM_HI] = checksum >> 8
        cmos[CMOS_CHECKSUM_LO] = checksum & 0xFF


def _to_reg(value: int, binary: int) -> int:
    return value if binary else (value // 10 % 10) << 4 | value % 10


def _from_reg(value: int, binary: int) -> int:
    return value if binary else (value >> 4) * 10 + (value & 0x0F)
