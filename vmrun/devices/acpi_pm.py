"""ACPI fixed hardware (ACPI spec, chapter 4.8): PM1a event and control blocks, the PM timer,
and the reset register at 0xCF9.

The three PM register blocks share one state (status bits raised by one block are seen through
another), so :class:`AcpiPm` holds the state and exposes three small bus devices, inserted at
the addresses the FADT gives: ``event_block`` (PM1a_EVT_BLK, 4 bytes), ``control_block``
(PM1a_CNT_BLK, 2 bytes) and ``timer`` (PM_TMR_BLK, 4 bytes).

Why it is shaped this way:

* There is no SMI_CMD port, so the machine is in ACPI mode from reset: PM1_CNT.SCI_EN reads 1
  always.
* Sleep: writing SLP_EN with SLP_TYP equal to the DSDT's \\_S5 value powers off. Other sleep
  types are not implemented; the machine "wakes" at once (WAK_STS set) so an OS polling for
  the wake does not hang.
* The PM timer is derived from a monotonic clock, 32 bits at 3.579545 MHz (the FADT must set
  TMR_VAL_EXT). TMR_STS (the carry out of bit 31) is computed when the status is read; no
  timer thread drives it, so an SCI for it comes only with the next access.
* The SCI is a level: high while any status bit is set together with its enable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from vmrun.core import layout
from vmrun.core.bus import BusDevice
from vmrun.core.devstate import PlainState
from vmrun.core.irq import IrqLine

# PM1 status / enable bits.
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
PCIEXP_WAKE_STS = 1 << 14
WAK_STS = 1 << 15
PM1_STS_MASK = (TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS
                | PCIEXP_WAKE_STS | WAK_STS)

TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
PCIEXP_WAKE_DIS = 1 << 14
PM1_EN_MASK = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN | PCIEXP_WAKE_DIS
SCI_SOURCES = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS   # status bits with enables

# PM1 control bits.
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2           # write-only
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13           # write-only
PM1_CNT_WRITE_ONLY = GBL_RLS | SLP_EN

# Reset control register (0xCF9).
SYS_RST = 0x02
RST_CPU = 0x04
FULL_RST = 0x08

TMR_CARRY_BIT = 31


class AcpiPm(PlainState):
    """PM1a event/control state, the PM timer and the SCI; see the module docstring."""

    def __init__(self, sci: IrqLine, on_power_off: Callable[[], None],
                 on_sleep: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sci = sci
        self._on_power_off = on_power_off
        self._on_sleep = on_sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._status = 0
        self._enable = 0
        self._control = SCI_EN
        self._t0 = clock()
        self._tmr_carry = 0        # bit 31 of the timer when the status was last looked at
        self._level = False
        self.event_block = Pm1EventBlock(self)
        self.control_block = Pm1ControlBlock(self)
        self.timer = PmTimer(self)

    # -- host side ---------------------------------------------------------------------
    def press_power_button(self) -> None:
        """The fixed-hardware power button: PWRBTN_STS, an SCI if the OS enabled it."""
        with self._lock:
            self._status |= PWRBTN_STS
            self._update_sci()

    def bus_ranges(self) -> list[tuple[BusDevice, int, int]]:
        """(device, port, length) for each block, at the layout's addresses."""
        return [(self.event_block, layout.PM1A_EVT_PORT, layout.PM1A_EVT_LEN),
                (self.control_block, layout.PM1A_CNT_PORT, layout.PM1A_CNT_LEN),
                (self.timer, layout.PM_TMR_PORT, layout.PM_TMR_LEN)]

    # -- timer -------------------------------------------------------------------------
    def timer_value(self) -> int:
        """The PM timer: 32-bit count at PM_TMR_HZ since the device was created."""
        return int((self._clock() - self._t0) * layout.PM_TMR_HZ) & 0xFFFF_FFFF

    def _poll_timer_carry(self) -> None:
        carry = self.timer_value() >> TMR_CARRY_BIT
        if carry != self._tmr_carry:
            self._tmr_carry = carry
            self._status |= TMR_STS

    # -- PM1 event block -----------------------------------------------------------------
    def _read_event(self) -> int:
        with self._lock:
            self._poll_timer_carry()
            self._update_sci()
            return self._status | self._enable << 16

    def _write_event_byte(self, offset: int, byte: int) -> None:
        with self._lock:
            if offset < 2:
                self._status &= ~(byte << (8 * offset))      # write 1 to clear
            else:
                shift = 8 * (offset - 2)
                self._enable = ((self._enable & ~(0xFF << shift)) | byte << shift) & PM1_EN_MASK
            self._update_sci()

    # -- PM1 control block ---------------------------------------------------------------
    def _read_control(self) -> int:
        with self._lock:
            return (self._control | SCI_EN) & ~PM1_CNT_WRITE_ONLY

    def _write_control(self, value: int, mask: int) -> None:
        slp_typ = -1
        with self._lock:
            new = (self._control & ~mask) | (value & mask)
            if new & SLP_EN:
                slp_typ = (new & SLP_TYP_MASK) >> SLP_TYP_SHIFT
                if slp_typ != layout.SLP_TYP_S5:
                    self._status |= WAK_STS          # not implemented: wake at once
            self._control = (new | SCI_EN) & ~PM1_CNT_WRITE_ONLY
            self._update_sci()
        if slp_typ == layout.SLP_TYP_S5:
            self._on_power_off()
        elif slp_typ >= 0 and self._on_sleep is not None:
            self._on_sleep(slp_typ)

    # -- SCI -------------------------------------------------------------------------------
    def _update_sci(self) -> None:
        level = bool(self._status & self._enable & SCI_SOURCES) and bool(self._control & SCI_EN)
        if level != self._level:
            self._level = level
            self._sci.set_level(level)


def _window(value: int, width: int, offset: int, size: int) -> int:
    """Bytes ``offset..offset+size`` of a ``width``-byte register; all ones past its end."""
    result = (1 << (8 * size)) - 1
    for i in range(size):
        if offset + i < width:
            result &= ~(0xFF << (8 * i))
            result |= ((value >> (8 * (offset + i))) & 0xFF) << (8 * i)
    return result


class Pm1EventBlock:
    """PM1a_EVT_BLK: PM1_STS (offset 0, write 1 to clear) and PM1_EN (offset 2)."""

    def __init__(self, pm: AcpiPm) -> None:
        self._pm = pm

    def read(self, offset: int, size: int) -> int:
        return _window(self._pm._read_event(), 4, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            if offset + i < 4:
                self._pm._write_event_byte(offset + i, (value >> (8 * i)) & 0xFF)


class Pm1ControlBlock:
    """PM1a_CNT_BLK: PM1_CNT (SCI_EN, SLP_TYP, SLP_EN)."""

    def __init__(self, pm: AcpiPm) -> None:
        self._pm = pm

    def read(self, offset: int, size: int) -> int:
        return _window(self._pm._read_control(), 2, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= 2:
            return
        mask = ((1 << (8 * size)) - 1) << (8 * offset) & 0xFFFF
        self._pm._write_control((value << (8 * offset)) & 0xFFFF, mask)


class PmTimer:
    """PM_TMR_BLK: the read-only 32-bit PM timer."""

    def __init__(self, pm: AcpiPm) -> None:
        self._pm = pm

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self._pm.timer_value()
        return _window(self._pm.timer_value(), 4, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class ResetControl:
    """The reset control register at 0xCF9: a write with RST_CPU (bit 2) set resets.

    The usual values are 0x06 (SYS_RST | RST_CPU) and 0x0E (FULL_RST too); either way the VM
    is rebuilt, so hard, soft and full resets are the same here.
    """

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._value = 0

    def read(self, offset: int, size: int) -> int:
        return _window(self._value, 1, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return
        byte = value & 0xFF
        self._value = byte & ~RST_CPU
        if byte & RST_CPU:
            self._on_reset()
