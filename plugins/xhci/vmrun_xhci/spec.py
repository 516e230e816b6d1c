"""xHCI 1.1 numbers: TRB types, completion codes, register bits, context fields.

Shared by the controller and by tests (which import them rather than repeat magic numbers).
"""

from __future__ import annotations

# -- TRB types (xHCI 1.1, table 6-91) -------------------------------------------------------
TRB_NORMAL, TRB_SETUP, TRB_DATA, TRB_STATUS, TRB_ISOCH, TRB_LINK, TRB_EVENT_DATA, \
    TRB_NOOP = range(1, 9)
CMD_ENABLE_SLOT, CMD_DISABLE_SLOT, CMD_ADDRESS_DEVICE, CMD_CONFIGURE_EP, CMD_EVALUATE_CTX, \
    CMD_RESET_EP, CMD_STOP_EP, CMD_SET_TR_DEQ, CMD_RESET_DEVICE, CMD_FORCE_EVENT, \
    CMD_NEGOTIATE_BW, CMD_SET_LT, CMD_GET_PORT_BW, CMD_FORCE_HEADER, CMD_NOOP = range(9, 24)
EV_TRANSFER, EV_CMD_COMPLETION, EV_PORT_STATUS, EV_BANDWIDTH, EV_DOORBELL, EV_HOST_CONTROLLER, \
    EV_DEVICE_NOTIFICATION, EV_MFINDEX_WRAP = range(32, 40)
EV_NEC_CMD_COMPLETION, CMD_NEC_GET_FW = 48, 49      # NEC uPD720200 vendor command (Linux asks)

# -- completion codes (table 6-90) ----------------------------------------------------------
CC_SUCCESS = 1
CC_DATA_BUFFER = 2
CC_BABBLE = 3
CC_TRANSACTION = 4
CC_TRB = 5
CC_STALL = 6
CC_RESOURCE = 7
CC_BANDWIDTH = 8
CC_NO_SLOTS = 9
CC_INVALID_STREAM_TYPE = 10
CC_SLOT_NOT_ENABLED = 11
CC_EP_NOT_ENABLED = 12
CC_SHORT_PACKET = 13
CC_PARAMETER = 17
CC_CONTEXT_STATE = 19
CC_EVENT_RING_FULL = 21
CC_CMD_RING_STOPPED = 24
CC_CMD_ABORTED = 25
CC_STOPPED = 26
CC_STOPPED_LENGTH_INVALID = 27

# -- TRB control bits -----------------------------------------------------------------------
TRB_C = 1 << 0            # cycle
TRB_TC = 1 << 1           # link: toggle cycle
TRB_ENT = 1 << 1          # evaluate next TRB
TRB_ISP = 1 << 2          # interrupt on short packet
TRB_NS = 1 << 3
TRB_CH = 1 << 4           # chain
TRB_IOC = 1 << 5          # interrupt on completion
TRB_IDT = 1 << 6          # immediate data
TRB_BEI = 1 << 9          # block event interrupt
TRB_DIR_IN = 1 << 16      # data/status stage direction
TRB_BSR = 1 << 9          # address device: block SET_ADDRESS request
TRB_DC = 1 << 9           # configure endpoint: deconfigure
TRB_TSP = 1 << 9          # reset endpoint: transfer state preserve
EVENT_ED = 1 << 2         # transfer event: the parameter is an Event Data TRB's data

# -- registers ------------------------------------------------------------------------------
CAPLENGTH = 0x40
HCIVERSION = 0x0110
OP = CAPLENGTH            # operational registers
RT = 0x1000               # runtime registers (RTSOFF)
DB = 0x2000               # doorbell array (DBOFF)
BAR_SIZE = 0x4000
PORT_REGS = OP + 0x400    # PORTSC of port 1; 0x10 per port
XECP = 0x20               # first extended capability (supported protocols), in the cap area

USBCMD_RS, USBCMD_HCRST, USBCMD_INTE, USBCMD_HSEE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
USBCMD_LHCRST, USBCMD_CSS, USBCMD_CRS, USBCMD_EWE = 1 << 7, 1 << 8, 1 << 9, 1 << 10
USBCMD_EU3S = 1 << 11
USBCMD_RW = USBCMD_RS | USBCMD_INTE | USBCMD_HSEE | USBCMD_EWE | USBCMD_EU3S
USBSTS_HCH, USBSTS_HSE, USBSTS_EINT, USBSTS_PCD = 1 << 0, 1 << 2, 1 << 3, 1 << 4
USBSTS_SSS, USBSTS_RSS, USBSTS_SRE, USBSTS_CNR, USBSTS_HCE = \
    1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
USBSTS_W1C = USBSTS_HSE | USBSTS_EINT | USBSTS_PCD | USBSTS_SRE
CRCR_RCS, CRCR_CS, CRCR_CA, CRCR_CRR = 1 << 0, 1 << 1, 1 << 2, 1 << 3

PORTSC_CCS, PORTSC_PED, PORTSC_OCA, PORTSC_PR = 1 << 0, 1 << 1, 1 << 3, 1 << 4
PORTSC_PLS_SHIFT, PORTSC_PLS = 5, 0xF << 5
PORTSC_PP = 1 << 9
PORTSC_SPEED_SHIFT, PORTSC_SPEED = 10, 0xF << 10
PORTSC_PIC = 3 << 14
PORTSC_LWS = 1 << 16
PORTSC_CSC, PORTSC_PEC, PORTSC_WRC, PORTSC_OCC = 1 << 17, 1 << 18, 1 << 19, 1 << 20
PORTSC_PRC, PORTSC_PLC, PORTSC_CEC, PORTSC_CAS = 1 << 21, 1 << 22, 1 << 23, 1 << 24
PORTSC_WCE, PORTSC_WDE, PORTSC_WOE = 1 << 25, 1 << 26, 1 << 27
PORTSC_DR, PORTSC_WPR = 1 << 30, 1 << 31
PORTSC_CHANGE = PORTSC_CSC | PORTSC_PEC | PORTSC_WRC | PORTSC_OCC | PORTSC_PRC | PORTSC_PLC \
    | PORTSC_CEC
PORTSC_RWS = PORTSC_PIC | PORTSC_WCE | PORTSC_WDE | PORTSC_WOE
PLS_U0, PLS_U3, PLS_DISABLED, PLS_RXDETECT, PLS_POLLING, PLS_RESUME = 0, 3, 4, 5, 7, 15
SPEED_FULL, SPEED_LOW, SPEED_HIGH, SPEED_SUPER = 1, 2, 3, 4

IMAN_IP, IMAN_IE = 1 << 0, 1 << 1
ERDP_EHB = 1 << 3

# -- contexts -------------------------------------------------------------------------------
SLOT_DISABLED_OR_ENABLED, SLOT_DEFAULT, SLOT_ADDRESSED, SLOT_CONFIGURED = 0, 1, 2, 3
EP_DISABLED, EP_RUNNING, EP_HALTED, EP_STOPPED, EP_ERROR = 0, 1, 2, 3, 4
EPT_ISOCH_OUT, EPT_BULK_OUT, EPT_INTR_OUT, EPT_CONTROL, EPT_ISOCH_IN, EPT_BULK_IN, \
    EPT_INTR_IN = range(1, 8)
