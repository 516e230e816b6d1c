"""The 82545EM's internal PHY, a Marvell 88E1011 (ID 0x01410C20), at MDIO address 1.

What the drivers look at: the IEEE registers (control with reset and autonegotiation
restart, status with link and autonegotiation complete, the IDs, advertisement and link
partner ability, 1000BASE-T control/status, extended status) and Marvell's PHY specific
status (speed, duplex, link resolved). Autonegotiation completes at once when the host side
of the link is up: the link partner is always 1000 Mb/s full duplex with PAUSE.

The status register's link bit latches low (IEEE 802.3 22.2.4.2.13): after the link went down,
the first read says down even if it is back up — which is why drivers read it twice.
"""

from __future__ import annotations

# Register numbers.
PHY_CTRL, PHY_STATUS, PHY_ID1, PHY_ID2 = 0, 1, 2, 3
PHY_AUTONEG_ADV, PHY_LP_ABILITY, PHY_AUTONEG_EXP = 4, 5, 6
PHY_NEXT_PAGE_TX, PHY_LP_NEXT_PAGE = 7, 8
PHY_1000T_CTRL, PHY_1000T_STATUS, PHY_EXT_STATUS = 9, 10, 15
M88_PHY_SPEC_CTRL, M88_PHY_SPEC_STATUS = 16, 17
M88_INT_ENABLE, M88_INT_STATUS = 18, 19
M88_EXT_PHY_SPEC_CTRL, M88_RX_ERR_CNTR = 20, 21

# PHY_CTRL bits.
MII_CR_SPEED_1000 = 0x0040
MII_CR_FULL_DUPLEX = 0x0100
MII_CR_RESTART_AUTO_NEG = 0x0200
MII_CR_POWER_DOWN = 0x0800
MII_CR_AUTO_NEG_EN = 0x1000
MII_CR_RESET = 0x8000
# PHY_STATUS bits.
MII_SR_LINK_STATUS = 0x0004
MII_SR_AUTONEG_COMPLETE = 0x0020
STATUS_BASE = 0x7949         # 10/100 half/full, ext status, preamble suppr., AN able, ext cap
LINK_UP_STATUS = STATUS_BASE | MII_SR_LINK_STATUS | MII_SR_AUTONEG_COMPLETE   # 0x796D

PHY_ID = 0x01410C20          # Linux: M88E1011_I_PHY_ID (revision 0)
LP_ABILITY = 0x45E1          # ACK, PAUSE, 100/10 full and half, IEEE 802.3
LP_1000T = 0x3C00            # local and remote receiver OK, partner 1000 full and half
M88_STATUS_1000_FD = 0xAC00  # 1000 Mb/s, full duplex, speed/duplex resolved, link

_DEFAULTS = {
    PHY_CTRL: MII_CR_AUTO_NEG_EN | MII_CR_FULL_DUPLEX | MII_CR_SPEED_1000,
    PHY_ID1: PHY_ID >> 16,
    PHY_ID2: PHY_ID & 0xFFFF,
    PHY_AUTONEG_ADV: 0x0DE1,
    PHY_NEXT_PAGE_TX: 0x2001,
    PHY_1000T_CTRL: 0x0300,
    PHY_EXT_STATUS: 0x3000,
    M88_PHY_SPEC_CTRL: 0x0068,
    M88_EXT_PHY_SPEC_CTRL: 0x0C60,
}
#: Registers the driver cannot change (the rest store what it writes).
_READ_ONLY = frozenset((PHY_STATUS, PHY_ID1, PHY_ID2, PHY_LP_ABILITY, PHY_AUTONEG_EXP,
                        PHY_LP_NEXT_PAGE, PHY_1000T_STATUS, PHY_EXT_STATUS,
                        M88_PHY_SPEC_STATUS, M88_INT_STATUS, M88_RX_ERR_CNTR))


class Phy:
    def __init__(self) -> None:
        self.carrier = True       # the host side of the link
        self.reset()

    def reset(self) -> None:
        self.regs = [0] * 32
        for reg, value in _DEFAULTS.items():
            self.regs[reg] = value
        self.autoneg_done = False
        self.latched_down = False
        self._negotiate()

    @property
    def link(self) -> bool:
        """Link as the MAC sees it (STATUS.LU)."""
        return self.carrier and not self.regs[PHY_CTRL] & MII_CR_POWER_DOWN

    def _negotiate(self) -> None:
        """Restart autonegotiation: with a carrier it completes at once."""
        ctrl = self.regs[PHY_CTRL]
        self.autoneg_done = self.link and bool(ctrl & MII_CR_AUTO_NEG_EN)

    def set_carrier(self, up: bool) -> bool:
        """The host side went up or down; True when the link the MAC sees changed."""
        before = self.link
        self.carrier = up
        if not up:
            self.latched_down = True
        self._negotiate()
        return before != self.link

    def read(self, reg: int) -> int:
        reg &= 0x1F
        link = self.link
        if reg == PHY_STATUS:
            v = STATUS_BASE
            if link and not self.latched_down:
                v |= MII_SR_LINK_STATUS
            if self.autoneg_done:
                v |= MII_SR_AUTONEG_COMPLETE
            self.latched_down = False
            return v
        if reg == PHY_LP_ABILITY:
            return LP_ABILITY if self.autoneg_done else 0
        if reg == PHY_AUTONEG_EXP:
            return 0x0001 if self.autoneg_done else 0
        if reg == PHY_1000T_STATUS:
            return LP_1000T if self.autoneg_done else 0
        if reg == M88_PHY_SPEC_STATUS:
            return M88_STATUS_1000_FD if link else 0
        if reg == M88_INT_STATUS:
            return 0
        return self.regs[reg]

    def write(self, reg: int, value: int) -> bool:
        """Store a driver's write; True when the link the MAC sees changed."""
        reg &= 0x1F
        value &= 0xFFFF
        if reg in _READ_ONLY:
            return False
        before = self.link
        if reg == PHY_CTRL:
            # Reset and restart are self-clearing; a soft reset applies the written bits.
            restart = value & (MII_CR_RESET | MII_CR_RESTART_AUTO_NEG)
            self.regs[PHY_CTRL] = value & ~(MII_CR_RESET | MII_CR_RESTART_AUTO_NEG)
            if restart or not value & MII_CR_AUTO_NEG_EN or self.link != before:
                self._negotiate()
            if before and not self.link:
                self.latched_down = True
            return before != self.link
        self.regs[reg] = value
        return False
