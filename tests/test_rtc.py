"""The MC146818A RTC / CMOS model, through ports 0x70/0x71 (offsets 0/1) and ``tick``."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrun.core import layout
from vmrun.core.irq import RecordingIrqLine
from vmrun.devices import rtc as r
from vmrun.devices.rtc import CmosRtc

# Thursday 2024-02-29 13:45:56 UTC, plus a quarter second.
T0 = calendar.timegm((2024, 2, 29, 13, 45, 56)) + 0.25


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rig:
    def __init__(self, utc: bool = True, memory_bytes: int = 0, t: float = T0) -> None:
        self.irq = RecordingIrqLine()
        self.clock = Clock(t)
        self.dev = CmosRtc(self.irq, utc=utc, clock=self.clock, memory_bytes=memory_bytes)

    def rd(self, index: int) -> int:
        self.dev.write(0, 1, index)
        return self.dev.read(1, 1)

    def wr(self, index: int, value: int) -> None:
        self.dev.write(0, 1, index)
        self.dev.write(1, 1, value)

    def time_regs(self) -> tuple[int, ...]:
        return tuple(self.rd(i) for i in (r.RTC_SECONDS, r.RTC_MINUTES, r.RTC_HOURS,
                                          r.RTC_DAY_OF_WEEK, r.RTC_DAY_OF_MONTH, r.RTC_MONTH,
                                          r.RTC_YEAR, r.RTC_CENTURY))

    def no_periodic(self) -> Rig:
        """RS = 0: PF is set at the periodic rate even with PIE off; keep it out of C."""
        self.wr(r.RTC_REG_A, 0x20)
        return self

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.dev.tick(self.clock.t)


def test_power_on_registers() -> None:
    rig = Rig()
    assert rig.rd(r.RTC_REG_A) == r.REG_A_DEFAULT
    assert rig.rd(r.RTC_REG_B) == r.REG_B_24H          # BCD, 24-hour
    assert rig.rd(r.RTC_REG_C) == 0
    assert rig.rd(r.RTC_REG_D) == r.REG_D_VRT
    assert rig.dev.read(0, 1) == 0xFF                  # the index port is write-only


def test_bcd_time() -> None:
    rig = Rig()
    # sec, min, hour, weekday (Thursday = 5, Sunday = 1), day, month, year, century
    assert rig.time_regs() == (0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20)


def test_binary_time() -> None:
    rig = Rig()
    rig.wr(r.RTC_REG_B, r.REG_B_24H | r.REG_B_DM)
    assert rig.time_regs() == (56, 45, 13, 5, 29, 2, 24, 20)


@pytest.mark.parametrize("hour,bcd,binary", [(0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11),
                                             (12, 0x92, 0x8C), (13, 0x81, 0x81),
                                             (23, 0x91, 0x8B)])
def test_twelve_hour_mode(hour: int, bcd: int, binary: int) -> None:
    rig = Rig(t=calendar.timegm((2024, 2, 29, hour, 0, 0)))
    rig.wr(r.RTC_REG_B, 0)
    assert rig.rd(r.RTC_HOURS) == bcd
    rig.wr(r.RTC_REG_B, r.REG_B_DM)
    assert rig.rd(r.RTC_HOURS) == binary


def test_local_time() -> None:
    rig = Rig(utc=False)
    tm = time.localtime(int(T0))
    rig.wr(r.RTC_REG_B, r.REG_B_24H | r.REG_B_DM)
    assert rig.rd(r.RTC_HOURS) == tm.tm_hour
    assert rig.rd(r.RTC_MINUTES) == tm.tm_min
    assert rig.rd(r.RTC_DAY_OF_MONTH) == tm.tm_mday


def test_clock_follows_host() -> None:
    rig = Rig()
    rig.clock.t += 5
    assert rig.rd(r.RTC_SECONDS) == 0x01
    assert rig.rd(r.RTC_MINUTES) == 0x46


def test_uip_before_each_update() -> None:
    rig = Rig(t=math_floor(T0) + 0.5)
    assert not rig.rd(r.RTC_REG_A) & r.REG_A_UIP
    rig.clock.t = math_floor(T0) + 1 - 100e-6
    assert rig.rd(r.RTC_REG_A) & r.REG_A_UIP
    rig.clock.t = math_floor(T0) + 1 - 300e-6
    assert not rig.rd(r.RTC_REG_A) & r.REG_A_UIP
    rig.clock.t = math_floor(T0) + 1 - 100e-6
    rig.wr(r.RTC_REG_B, r.REG_B_SET | r.REG_B_24H)   # updates inhibited: no UIP
    assert not rig.rd(r.RTC_REG_A) & r.REG_A_UIP


def math_floor(x: float) -> int:
    return int(x // 1)


def test_set_bit_freezes_then_commits_guest_time() -> None:
    """What ``hwclock -w`` does: SET, write every time register, clear SET."""
    rig = Rig()
    rig.wr(r.RTC_REG_B, r.REG_B_SET | r.REG_B_24H)
    rig.clock.t += 3
    assert rig.rd(r.RTC_SECONDS) == 0x56               # frozen
    for index, value in ((r.RTC_SECONDS, 0x05), (r.RTC_MINUTES, 0x04), (r.RTC_HOURS, 0x03),
                         (r.RTC_DAY_OF_MONTH, 0x02), (r.RTC_MONTH, 0x01), (r.RTC_YEAR, 0x30)):
        rig.wr(index, value)
    assert rig.rd(r.RTC_MINUTES) == 0x04               # reads show what was written
    rig.clock.t += 100
    assert rig.rd(r.RTC_SECONDS) == 0x05
    rig.wr(r.RTC_REG_B, r.REG_B_24H)
    assert rig.time_regs() == (0x05, 0x04, 0x03, 0x04, 0x02, 0x01, 0x30, 0x20)  # Wednesday
    rig.clock.t += 61
    assert rig.time_regs()[:3] == (0x06, 0x05, 0x03)


def test_set_in_twelve_hour_binary_mode_and_century() -> None:
    rig = Rig()
    rig.wr(r.RTC_REG_B, r.REG_B_SET | r.REG_B_DM)
    rig.wr(r.RTC_HOURS, 0x80 | 11)                     # 11 PM
    rig.wr(r.RTC_CENTURY, 21)
    rig.wr(r.RTC_YEAR, 4)                              # 2104: February 29th exists
    rig.wr(r.RTC_REG_B, r.REG_B_DM | r.REG_B_24H)
    assert rig.rd(r.RTC_HOURS) == 23
    assert (rig.rd(r.RTC_CENTURY), rig.rd(r.RTC_YEAR)) == (21, 4)


def test_write_without_set_moves_the_clock() -> None:
    rig = Rig()
    rig.wr(r.RTC_MINUTES, 0x10)
    assert rig.time_regs()[:3] == (0x56, 0x10, 0x13)
    rig.clock.t += 4
    assert rig.rd(r.RTC_SECONDS) == 0x00 and rig.rd(r.RTC_MINUTES) == 0x11


def test_periodic_flag_is_set_even_without_pie() -> None:
    rig = Rig()
    rig.clock.t += 0.01
    assert rig.rd(r.RTC_REG_C) == r.REG_C_PF
    assert not rig.irq.changes


def test_invalid_time_is_not_committed() -> None:
    rig = Rig()
    rig.wr(r.RTC_REG_B, r.REG_B_SET | r.REG_B_24H)
    rig.wr(r.RTC_MONTH, 0x13)
    rig.wr(r.RTC_REG_B, r.REG_B_24H)
    assert rig.time_regs() == (0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20)
    rig.wr(r.RTC_SECONDS, 0x7A)                        # not BCD, not a second
    assert rig.rd(r.RTC_SECONDS) == 0x56


def test_update_ended_interrupt_and_register_c() -> None:
    rig = Rig().no_periodic()
    assert rig.dev.next_deadline() is None
    rig.wr(r.RTC_REG_B, r.REG_B_24H | r.REG_B_UIE)
    assert rig.dev.next_deadline() == pytest.approx(math_floor(T0) + 1)
    rig.advance(0.5)
    assert not rig.irq.level
    rig.advance(0.3)                                   # crosses the second boundary
    assert rig.irq.level
    assert rig.rd(r.RTC_REG_C) == r.REG_C_IRQF | r.REG_C_UF
    assert not rig.irq.level                           # read clears and lowers IRQ 8
    assert rig.rd(r.RTC_REG_C) == 0
    rig.advance(1)
    assert rig.irq.raised_count == 2


def test_flags_without_enables_and_late_enable() -> None:
    rig = Rig().no_periodic()
    rig.clock.t += 1
    assert rig.rd(r.RTC_REG_C) == r.REG_C_UF           # polled: flag, no IRQF, no IRQ
    assert not rig.irq.changes
    rig.advance(1)
    rig.wr(r.RTC_REG_B, r.REG_B_24H | r.REG_B_UIE)     # enabling with UF set interrupts
    assert rig.irq.level


def test_set_clears_uie() -> None:
    rig = Rig()
    rig.wr(r.RTC_REG_B, r.REG_B_SET | r.REG_B_UIE | r.REG_B_24H)
    assert rig.rd(r.RTC_REG_B) == r.REG_B_SET | r.REG_B_24H
    assert rig.dev.next_deadline() is None


def test_alarm_with_dont_care() -> None:
    rig = Rig().no_periodic()
    rig.wr(r.RTC_SECONDS_ALARM, 0x00)
    rig.wr(r.RTC_MINUTES_ALARM, 0xFF)                  # any minute
    rig.wr(r.RTC_HOURS_ALARM, 0xC0)                    # any hour
    rig.rd(r.RTC_REG_C)
    rig.wr(r.RTC_REG_B, r.REG_B_24H | r.REG_B_AIE)
    rig.advance(1)                                     # :57
    assert not rig.irq.level
    assert rig.rd(r.RTC_REG_C) == r.REG_C_UF
    rig.advance(2)                                     # :59
    assert not rig.irq.level
    rig.advance(1)                                     # 13:46:00 matches
    assert rig.irq.level
    assert rig.rd(r.RTC_REG_C) == r.REG_C_IRQF | r.REG_C_AF | r.REG_C_UF
    assert not rig.irq.level


def test_exact_alarm_in_twelve_hour_mode() -> None:
    rig = Rig().no_periodic()
    rig.wr(r.RTC_REG_B, r.REG_B_AIE)                   # 12-hour BCD
    rig.wr(r.RTC_SECONDS_ALARM, 0x58)
    rig.wr(r.RTC_MINUTES_ALARM, 0x45)
    rig.wr(r.RTC_HOURS_ALARM, 0x81)                    # 1 PM
    rig.advance(1)
    assert not rig.irq.level
    rig.advance(1)
    assert rig.irq.level
    rig.rd(r.RTC_REG_C)
    rig.advance(3600 * 12)                             # 1 AM does not match
    assert rig.rd(r.RTC_REG_C) == r.REG_C_UF


def test_periodic_interrupt() -> None:
    rig = Rig(t=1000.0)
    rig.wr(r.RTC_REG_A, 0x20 | 6)                      # 1024 Hz
    rig.wr(r.RTC_REG_B, r.REG_B_24H | r.REG_B_PIE)
    deadline = rig.dev.next_deadline()
    assert deadline == pytest.approx(1000.0 + 1 / 1024)
    rig.advance(0.5 / 1024)
    assert not rig.irq.level
    rig.clock.t = deadline
    rig.dev.tick(deadline)
    assert rig.irq.level
    assert rig.rd(r.RTC_REG_C) == r.REG_C_IRQF | r.REG_C_PF
    rig.wr(r.RTC_REG_A, 0x20 | 15)                     # 2 Hz
    assert rig.dev.next_deadline() == pytest.approx(1000.5)
    rig.wr(r.RTC_REG_A, 0x20)                          # RS = 0: no periodic interrupt
    assert rig.dev.next_deadline() is None


def test_cmos_ram_and_nmi_bit() -> None:
    rig = Rig()
    rig.wr(0x80 | 0x40, 0xA5)                          # bit 7 of the index is NMI disable
    assert rig.rd(0x40) == 0xA5
    rig.wr(0x7F, 0x11)
    assert rig.rd(0x7F) == 0x11
    rig.wr(r.RTC_REG_D, 0)
    assert rig.rd(r.RTC_REG_D) == r.REG_D_VRT
    rig.dev.write(0, 2, 0x3340)                        # outw: index 0x40, data 0x33
    assert rig.rd(0x40) == 0x33
    rig.dev.write(0, 1, 0x40)
    assert rig.dev.read(0, 2) == 0x33FF


def _word(rig: Rig, lo: int) -> int:
    return rig.rd(lo) | rig.rd(lo + 1) << 8


@pytest.mark.parametrize("mem,ext,above16m,above4g", [
    (128 * layout.MiB, 0xFFFF, 0x0700, 0),
    (4 * layout.GiB, 0xFFFF, 0xBF00, 0x4000),
    (8 * layout.GiB, 0xFFFF, 0xBF00, 0x14000),
    (32 * layout.MiB, 31 * 1024, 0x0100, 0),
])
def test_memory_size_bytes(mem: int, ext: int, above16m: int, above4g: int) -> None:
    rig = Rig(memory_bytes=mem)
    assert _word(rig, r.CMOS_BASE_MEM_LO) == 640
    assert _word(rig, r.CMOS_EXT_MEM_LO) == ext
    assert _word(rig, r.CMOS_EXT_MEM2_LO) == ext
    assert _word(rig, r.CMOS_MEM_16M_LO) == above16m
    assert rig.rd(0x5B) | rig.rd(0x5C) << 8 | rig.rd(0x5D) << 16 == above4g
    checksum = sum(rig.rd(i) for i in range(0x10, 0x2E))
    assert rig.rd(r.CMOS_CHECKSUM_HI) << 8 | rig.rd(r.CMOS_CHECKSUM_LO) == checksum


def test_no_memory_size_given() -> None:
    rig = Rig()
    assert all(rig.rd(i) == 0 for i in range(0x0E, 0x32))


_op = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 3), st.sampled_from([1, 2]), st.integers(0, 0xFFFF)),
    st.tuples(st.just("r"), st.integers(0, 3), st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(st.just("t"), st.just(0), st.just(0), st.integers(0, 5000)),
    st.tuples(st.just("c"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_op, max_size=60))
def test_random_accesses_keep_invariants(ops) -> None:
    rig = Rig()
    for kind, offset, size, value in ops:
        if kind == "w":
            rig.dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        elif kind == "r":
            assert 0 <= rig.dev.read(offset, size) < 1 << (8 * size)
        elif kind == "t":
            rig.advance(value / 1000)
        else:
            level = rig.irq.level
            c = rig.rd(r.RTC_REG_C)
            assert c & 0x0F == 0
            assert level == bool(c & r.REG_C_IRQF)
            assert not rig.irq.level
        assert rig.rd(r.RTC_REG_D) == r.REG_D_VRT
        assert rig.rd(r.RTC_REG_B) & (r.REG_B_SET | r.REG_B_UIE) != r.REG_B_SET | r.REG_B_UIE
        deadline = rig.dev.next_deadline()
        assert deadline is None or deadline > rig.clock.t - 1e-9
