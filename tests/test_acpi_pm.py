"""ACPI PM1a event/control blocks, PM timer and the 0xCF9 reset register, through the bus."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrun.core import layout
from vmrun.core.bus import PortBus
from vmrun.core.irq import RecordingIrqLine
from vmrun.devices import acpi_pm as pm
from vmrun.devices.acpi_pm import AcpiPm, ResetControl

EVT, CNT, TMR = layout.PM1A_EVT_PORT, layout.PM1A_CNT_PORT, layout.PM_TMR_PORT


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Rig:
    def __init__(self) -> None:
        self.sci = RecordingIrqLine()
        self.clock = Clock()
        self.power_offs = 0
        self.sleeps: list[int] = []
        self.dev = AcpiPm(self.sci, on_power_off=self._off, on_sleep=self.sleeps.append,
                          clock=self.clock)
        self.bus = PortBus()
        for device, port, length in self.dev.bus_ranges():
            self.bus.insert(device, port, length)

    def _off(self) -> None:
        self.power_offs += 1


def test_layout_and_power_on_state() -> None:
    rig = Rig()
    assert rig.bus.read(EVT, 2) == 0
    assert rig.bus.read(EVT + 2, 2) == 0
    assert rig.bus.read(CNT, 2) == pm.SCI_EN            # ACPI mode from reset (no SMI_CMD)
    assert not rig.sci.changes


def test_power_button_sci_and_write_one_to_clear() -> None:
    rig = Rig()
    rig.dev.press_power_button()
    assert rig.bus.read(EVT, 2) & pm.PWRBTN_STS
    assert not rig.sci.level                            # not enabled yet
    rig.bus.write(EVT + 2, 2, pm.PWRBTN_EN)
    assert rig.sci.level
    assert rig.bus.read(EVT + 2, 2) == pm.PWRBTN_EN
    rig.bus.write(EVT, 2, 0)                            # writing 0 clears nothing
    assert rig.sci.level
    rig.bus.write(EVT, 2, pm.PWRBTN_STS)
    assert not rig.sci.level
    assert rig.bus.read(EVT, 2) == 0
    rig.bus.write(EVT + 1, 1, pm.PWRBTN_STS >> 8)       # byte access to the high half
    rig.dev.press_power_button()
    assert rig.sci.level
    rig.bus.write(EVT + 1, 1, pm.PWRBTN_STS >> 8)
    assert not rig.sci.level
    assert rig.sci.changes == [True, False, True, False]


def test_dword_access_covers_status_and_enable() -> None:
    rig = Rig()
    rig.bus.write(EVT, 4, pm.PWRBTN_EN << 16)
    rig.dev.press_power_button()
    assert rig.bus.read(EVT, 4) == pm.PWRBTN_STS | pm.PWRBTN_EN << 16
    rig.bus.write(EVT, 4, pm.PWRBTN_STS | pm.PWRBTN_EN << 16)
    assert rig.bus.read(EVT, 4) == pm.PWRBTN_EN << 16
    assert not rig.sci.level


def test_power_button_from_another_thread() -> None:
    rig = Rig()
    rig.bus.write(EVT + 2, 2, pm.PWRBTN_EN)
    t = threading.Thread(target=rig.dev.press_power_button)
    t.start()
    t.join()
    assert rig.sci.level


def test_s5_powers_off() -> None:
    rig = Rig()
    slp_typ = layout.SLP_TYP_S5 << pm.SLP_TYP_SHIFT
    rig.bus.write(CNT, 2, slp_typ | pm.SCI_EN)           # SLP_TYP first, as ACPICA does
    assert rig.power_offs == 0
    rig.bus.write(CNT, 2, slp_typ | pm.SLP_EN | pm.SCI_EN)
    assert rig.power_offs == 1
    assert rig.bus.read(CNT, 2) & pm.SLP_EN == 0        # write-only
    assert rig.bus.read(CNT, 2) & pm.SLP_TYP_MASK == slp_typ


def test_s5_with_byte_write_of_high_half() -> None:
    rig = Rig()
    rig.bus.write(CNT + 1, 1, (layout.SLP_TYP_S5 << 2) | 0x20)   # SLP_TYP and SLP_EN
    assert rig.power_offs == 1


@pytest.mark.parametrize("slp_typ", [0, 1, 3, 7])
def test_other_sleep_types_wake_at_once(slp_typ: int) -> None:
    rig = Rig()
    rig.bus.write(CNT, 2, slp_typ << pm.SLP_TYP_SHIFT | pm.SLP_EN)
    assert rig.power_offs == 0
    assert rig.sleeps == [slp_typ]
    assert rig.bus.read(EVT, 2) & pm.WAK_STS
    rig.bus.write(EVT, 2, pm.WAK_STS)
    assert not rig.bus.read(EVT, 2) & pm.WAK_STS
    assert not rig.sci.changes                           # WAK_STS has no enable


def test_sci_en_stays_set() -> None:
    rig = Rig()
    rig.bus.write(CNT, 2, 0)
    assert rig.bus.read(CNT, 2) & pm.SCI_EN


def test_pm_timer_frequency_and_monotonic() -> None:
    rig = Rig()
    assert rig.bus.read(TMR, 4) == 0
    rig.clock.t += 1.0
    assert rig.bus.read(TMR, 4) == layout.PM_TMR_HZ
    last = 0
    for _ in range(1000):
        rig.clock.t += 0.000123
        value = rig.bus.read(TMR, 4)
        assert value > last
        last = value
    rig.bus.write(TMR, 4, 0)                             # read-only
    assert rig.bus.read(TMR, 4) == last
    assert rig.bus.read(TMR, 2) == last & 0xFFFF
    assert rig.bus.read(TMR + 2, 2) == last >> 16


def test_pm_timer_wraps_at_32_bits_and_sets_tmr_sts() -> None:
    rig = Rig()
    rig.bus.write(EVT + 2, 2, pm.TMR_EN)
    rig.clock.t += 0.5
    assert not rig.bus.read(EVT, 2) & pm.TMR_STS
    half = (1 << 31) / layout.PM_TMR_HZ                 # seconds per carry out of bit 31
    rig.clock.t = 100.0 + half + 0.001
    assert rig.bus.read(EVT, 2) & pm.TMR_STS
    assert rig.sci.level
    rig.bus.write(EVT, 2, pm.TMR_STS)
    assert not rig.sci.level
    rig.clock.t = 100.0 + 2 * half + 1.0                # wrapped: counting from zero again
    assert rig.bus.read(TMR, 4) == pytest.approx(layout.PM_TMR_HZ, abs=2)
    assert rig.bus.read(EVT, 2) & pm.TMR_STS            # bit 31 fell: another carry


def test_pm_timer_with_the_real_clock() -> None:
    import time

    dev = AcpiPm(RecordingIrqLine(), on_power_off=lambda: None)
    t0, v0 = time.monotonic(), dev.timer.read(0, 4)
    time.sleep(0.05)
    t1, v1 = time.monotonic(), dev.timer.read(0, 4)
    assert v1 > v0
    assert (v1 - v0) / (t1 - t0) == pytest.approx(layout.PM_TMR_HZ, rel=0.05)


def test_reset_register() -> None:
    resets = []
    dev = ResetControl(lambda: resets.append(1))
    dev.write(0, 1, 0x02)                                # SYS_RST alone: no reset yet
    assert resets == []
    assert dev.read(0, 1) == 0x02
    dev.write(0, 1, 0x06)
    assert resets == [1]
    assert dev.read(0, 1) == 0x02                        # bit 2 does not read back
    dev.write(0, 1, 0x0E)
    assert resets == [1, 1]
    assert dev.read(0, 1) == 0x0A
    bus = PortBus()
    bus.insert(dev, layout.RESET_PORT, 1)
    bus.write(layout.RESET_PORT, 1, layout.RESET_VALUE)
    assert len(resets) == 3


_ops = st.lists(st.tuples(st.sampled_from(["r", "w", "t", "button"]),
                          st.sampled_from([EVT, EVT + 1, EVT + 2, EVT + 3, CNT, CNT + 1,
                                           TMR, TMR + 2]),
                          st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)),
                max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_random_accesses_keep_invariants(ops) -> None:
    rig = Rig()
    last_tmr = 0
    for kind, port, size, value in ops:
        if kind == "r":
            assert 0 <= rig.bus.read(port, size) < 1 << (8 * size)
        elif kind == "w":
            rig.bus.write(port, size, value & ((1 << (8 * size)) - 1))
        elif kind == "t":
            rig.clock.t += (value % 1000) / 1000
        else:
            rig.dev.press_power_button()
        cnt = rig.bus.read(CNT, 2)
        assert cnt & pm.SCI_EN and not cnt & pm.PM1_CNT_WRITE_ONLY
        sts = rig.bus.read(EVT, 2)
        en = rig.bus.read(EVT + 2, 2)
        assert sts & ~pm.PM1_STS_MASK == 0 and en & ~pm.PM1_EN_MASK == 0
        assert rig.sci.level == bool(sts & en & pm.SCI_SOURCES)
        tmr = rig.bus.read(TMR, 4)
        assert tmr >= last_tmr                           # no wrap within 60 s
        last_tmr = tmr
