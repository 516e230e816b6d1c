"""82545EM register offsets and bits (Intel PCI/PCI-X Family of Gigabit Ethernet Controllers
Software Developer's Manual, 8254x, chapter 13), with the names Linux's e1000 driver uses."""

from __future__ import annotations

# -- BARs ---------------------------------------------------------------------------------
MMIO_SIZE = 0x20000          # BAR 0: the registers
IO_SIZE = 0x40               # BAR 1: IOADDR (0) / IODATA (4), the same registers
IOADDR, IODATA = 0x00, 0x04

# -- general ------------------------------------------------------------------------------
CTRL = 0x0000
STATUS = 0x0008
EECD = 0x0010
EERD = 0x0014
CTRL_EXT = 0x0018
FLA = 0x001C
MDIC = 0x0020
FCAL, FCAH, FCT = 0x0028, 0x002C, 0x0030
VET = 0x0038
ICR = 0x00C0
ITR = 0x00C4
ICS = 0x00C8
IMS = 0x00D0
IMC = 0x00D8
RCTL = 0x0100
FCTTV = 0x0170
TXCW = 0x0178
RXCW = 0x0180
TCTL = 0x0400
TIPG = 0x0410
LEDCTL = 0x0E00
PBA = 0x1000
FCRTL, FCRTH = 0x2160, 0x2168
RDBAL, RDBAH, RDLEN, RDH, RDT = 0x2800, 0x2804, 0x2808, 0x2810, 0x2818
RDTR = 0x2820
RXDCTL = 0x2828
RADV = 0x282C
RSRPD = 0x2C00
TDBAL, TDBAH, TDLEN, TDH, TDT = 0x3800, 0x3804, 0x3808, 0x3810, 0x3818
TIDV = 0x3820
TXDCTL = 0x3828
TADV = 0x382C
TSPMT = 0x3830
RXCSUM = 0x5000
MTA = 0x5200                 # 128 dwords
RA = 0x5400                  # 16 x (RAL, RAH)
VFTA = 0x5600                # 128 dwords
WUC, WUFC, WUS = 0x5800, 0x5808, 0x5810
MANC = 0x5820

MTA_WORDS = 128
RA_ENTRIES = 16
VFTA_WORDS = 128

# -- statistics (0x4000..0x40FC): all clear on read, and stick at their maximum ----------
CRCERRS, ALGNERRC, SYMERRS, RXERRC, MPC = 0x4000, 0x4004, 0x4008, 0x400C, 0x4010
SCC, ECOL, MCC, LATECOL, COLC = 0x4014, 0x4018, 0x401C, 0x4020, 0x4028
DC, TNCRS, SEC, CEXTERR, RLEC = 0x4030, 0x4034, 0x4038, 0x403C, 0x4040
XONRXC, XONTXC, XOFFRXC, XOFFTXC, FCRUC = 0x4048, 0x404C, 0x4050, 0x4054, 0x4058
PRC64, PRC127, PRC255, PRC511, PRC1023, PRC1522 = (
    0x405C, 0x4060, 0x4064, 0x4068, 0x406C, 0x4070)
GPRC, BPRC, MPRC, GPTC = 0x4074, 0x4078, 0x407C, 0x4080
GORCL, GORCH, GOTCL, GOTCH = 0x4088, 0x408C, 0x4090, 0x4094
RNBC, RUC, RFC, ROC, RJC = 0x40A0, 0x40A4, 0x40A8, 0x40AC, 0x40B0
MGTPRC, MGTPDC, MGTPTC = 0x40B4, 0x40B8, 0x40BC
TORL, TORH, TOTL, TOTH = 0x40C0, 0x40C4, 0x40C8, 0x40CC
TPR, TPT = 0x40D0, 0x40D4
PTC64, PTC127, PTC255, PTC511, PTC1023, PTC1522 = (
    0x40D8, 0x40DC, 0x40E0, 0x40E4, 0x40E8, 0x40EC)
MPTC, BPTC, TSCTC, TSCTFC = 0x40F0, 0x40F4, 0x40F8, 0x40FC
STATS_START, STATS_END = 0x4000, 0x4100
#: The 64-bit counters: low register, high register.
STATS64 = {GORCL: GORCH, GOTCL: GOTCH, TORL: TORH, TOTL: TOTH}

# -- CTRL ---------------------------------------------------------------------------------
CTRL_FD = 1 << 0
CTRL_LRST = 1 << 3
CTRL_ASDE = 1 << 5
CTRL_SLU = 1 << 6
CTRL_SPD_1000 = 2 << 8
CTRL_RST = 1 << 26
CTRL_VME = 1 << 30
CTRL_PHY_RST = 1 << 31

# -- STATUS -------------------------------------------------------------------------------
STATUS_FD = 1 << 0
STATUS_LU = 1 << 1
STATUS_SPEED_1000 = 2 << 6
STATUS_ASDV_1000 = 2 << 8

# -- EECD / EERD --------------------------------------------------------------------------
EECD_SK, EECD_CS, EECD_DI, EECD_DO = 0x01, 0x02, 0x04, 0x08
EECD_FWE = 0x30
EECD_REQ, EECD_GNT, EECD_PRES, EECD_SIZE = 0x40, 0x80, 0x100, 0x200
EERD_START, EERD_DONE = 1 << 0, 1 << 4
EERD_ADDR_SHIFT, EERD_DATA_SHIFT = 8, 16

# -- MDIC ---------------------------------------------------------------------------------
MDIC_DATA = 0xFFFF
MDIC_REG_SHIFT, MDIC_PHY_SHIFT, MDIC_OP_SHIFT = 16, 21, 26
MDIC_OP_WRITE, MDIC_OP_READ = 1, 2
MDIC_READY, MDIC_INT_EN, MDIC_ERROR = 1 << 28, 1 << 29, 1 << 30
PHY_ADDR = 1                 # the internal PHY's MDIO address

# -- interrupt causes (ICR, ICS, IMS, IMC) ------------------------------------------------
ICR_TXDW = 1 << 0            # a descriptor with RS was written back
ICR_TXQE = 1 << 1            # transmit ring empty
ICR_LSC = 1 << 2             # link status change
ICR_RXSEQ = 1 << 3
ICR_RXDMT0 = 1 << 4          # free receive descriptors below RCTL.RDMTS
ICR_RXO = 1 << 6             # receiver overrun
ICR_RXT0 = 1 << 7            # receiver timer (a packet was stored)
ICR_MDAC = 1 << 9            # MDI/O access complete
ICR_TXD_LOW = 1 << 15
ICR_SRPD = 1 << 16
ICR_MASK = 0x0001F6DF        # the causes an 82545EM has

# -- RCTL ---------------------------------------------------------------------------------
RCTL_EN = 1 << 1
RCTL_SBP = 1 << 2
RCTL_UPE = 1 << 3            # unicast promiscuous
RCTL_MPE = 1 << 4            # multicast promiscuous
RCTL_LPE = 1 << 5            # long packets (up to 16 KiB)
RCTL_LBM = 3 << 6
RCTL_RDMTS_SHIFT = 8
RCTL_MO_SHIFT = 12
RCTL_BAM = 1 << 15           # accept broadcast
RCTL_BSIZE_SHIFT = 16
RCTL_VFE = 1 << 18
RCTL_BSEX = 1 << 25
RCTL_SECRC = 1 << 26         # strip the Ethernet CRC

# -- TCTL ---------------------------------------------------------------------------------
TCTL_EN = 1 << 1
TCTL_PSP = 1 << 3            # pad short packets

# -- RXCSUM / RDTR / RAH ------------------------------------------------------------------
RXCSUM_IPOFL = 1 << 8
RXCSUM_TUOFL = 1 << 9
RDTR_FPD = 1 << 31
RAH_AV = 1 << 31

# -- transmit descriptors -----------------------------------------------------------------
TXD_CMD_EOP = 0x01
TXD_CMD_IFCS = 0x02
TXD_CMD_IC = 0x04            # legacy: insert checksum; extended: TSE
TXD_CMD_TSE = 0x04
TXD_CMD_RS = 0x08
TXD_CMD_DEXT = 0x20
TXD_CMD_VLE = 0x40
TXD_CMD_IDE = 0x80
TXD_STAT_DD = 0x01
TXD_DTYP_C, TXD_DTYP_D = 0x0, 0x1
TUCMD_TCP = 0x01             # context: TCP (else UDP)
TUCMD_IP = 0x02              # context: IPv4 (else IPv6)
TUCMD_TSE = 0x04
POPTS_IXSM = 0x01            # insert the IP checksum
POPTS_TXSM = 0x02            # insert the TCP/UDP checksum

# -- receive descriptors ------------------------------------------------------------------
RXD_STAT_DD = 0x01
RXD_STAT_EOP = 0x02
RXD_STAT_IXSM = 0x04         # ignore the checksum indications
RXD_STAT_VP = 0x08           # 802.1Q tag stripped into "special"
RXD_STAT_TCPCS = 0x20
RXD_STAT_IPCS = 0x40
RXD_ERR_TCPE = 0x20
RXD_ERR_IPE = 0x40

DESC_SIZE = 16
