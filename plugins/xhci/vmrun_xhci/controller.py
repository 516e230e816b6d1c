"""The xHCI 1.1 host controller: registers, command ring, event rings, slots, transfer rings.

Layout of BAR 0 (16 KiB, 64-bit; the MSI-X table and PBA are in BAR 2): capability registers
at 0, two Supported Protocol extended capabilities at 0x20 (USB 2.0 ports 1-4, USB 3.0 ports
5-8), operational registers at 0x40 with the port registers at 0x440, runtime registers
(MFINDEX, 8 interrupters) at 0x1000, doorbells at 0x2000.

Threads. Register reads and writes run on vCPU threads and only change register state;
everything that touches guest memory — commands, transfers, event rings, contexts — runs on
the devices' event loop: a doorbell is an ioeventfd (``add_doorbell``, the endpoint 0 and
endpoint 1 IN doorbells of every slot and the command doorbell) or a ``call_soon`` from
``bar_write``. One lock guards the state between them. HID devices deliver input from the
hub's thread and the controller picks it up on the loop.

The guest owns rings, contexts and scratchpads: every TRB fetched is bounded by a per-kick
budget (:data:`TRB_BUDGET`) and a limit on consecutive Link TRBs (:data:`LINK_LIMIT`), so no
ring can keep the loop; malformed TRBs complete with TRB Error, commands in the wrong state
with Context State Error, missing slots/endpoints with Slot/EP Not Enabled, bad context
values with Parameter Error; memory the controller cannot reach (outside RAM, bus mastering
off) is a Host System Error: the controller halts with HSE until the driver resets it.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial

from vmrun.api import BAR_MEM64, BarSpec, GuestError, PciDevice, check_version, versioned
from vmrun_xhci.spec import (
    BAR_SIZE,
    CAPLENGTH,
    CC_CMD_RING_STOPPED,
    CC_CONTEXT_STATE,
    CC_EP_NOT_ENABLED,
    CC_NO_SLOTS,
    CC_PARAMETER,
    CC_SHORT_PACKET,
    CC_SLOT_NOT_ENABLED,
    CC_STALL,
    CC_STOPPED_LENGTH_INVALID,
    CC_SUCCESS,
    CC_TRANSACTION,
    CC_TRB,
    CMD_ADDRESS_DEVICE,
    CMD_CONFIGURE_EP,
    CMD_DISABLE_SLOT,
    CMD_ENABLE_SLOT,
    CMD_EVALUATE_CTX,
    CMD_NEC_GET_FW,
    CMD_NOOP,
    CMD_RESET_DEVICE,
    CMD_RESET_EP,
    CMD_SET_TR_DEQ,
    CMD_STOP_EP,
    CRCR_CA,
    CRCR_CRR,
    CRCR_CS,
    DB,
    EP_DISABLED,
    EP_ERROR,
    EP_HALTED,
    EP_RUNNING,
    EP_STOPPED,
    EPT_CONTROL,
    EPT_ISOCH_IN,
    EPT_ISOCH_OUT,
    ERDP_EHB,
    EV_CMD_COMPLETION,
    EV_MFINDEX_WRAP,
    EV_NEC_CMD_COMPLETION,
    EV_PORT_STATUS,
    EV_TRANSFER,
    EVENT_ED,
    HCIVERSION,
    IMAN_IE,
    IMAN_IP,
    OP,
    PLS_POLLING,
    PLS_RESUME,
    PLS_RXDETECT,
    PLS_U0,
    PLS_U3,
    PORT_REGS,
    PORTSC_CCS,
    PORTSC_CHANGE,
    PORTSC_CSC,
    PORTSC_LWS,
    PORTSC_PED,
    PORTSC_PLC,
    PORTSC_PLS,
    PORTSC_PLS_SHIFT,
    PORTSC_PP,
    PORTSC_PR,
    PORTSC_PRC,
    PORTSC_RWS,
    PORTSC_SPEED,
    PORTSC_SPEED_SHIFT,
    PORTSC_WPR,
    PORTSC_WRC,
    RT,
    SLOT_ADDRESSED,
    SLOT_CONFIGURED,
    SLOT_DEFAULT,
    SLOT_DISABLED_OR_ENABLED,
    TRB_BSR,
    TRB_CH,
    TRB_DATA,
    TRB_DC,
    TRB_DIR_IN,
    TRB_EVENT_DATA,
    TRB_IDT,
    TRB_IOC,
    TRB_ISP,
    TRB_LINK,
    TRB_NOOP,
    TRB_NORMAL,
    TRB_SETUP,
    TRB_STATUS,
    TRB_TC,
    USBCMD_CRS,
    USBCMD_EWE,
    USBCMD_HCRST,
    USBCMD_INTE,
    USBCMD_RS,
    USBCMD_RW,
    USBSTS_EINT,
    USBSTS_HCH,
    USBSTS_HSE,
    USBSTS_PCD,
    USBSTS_SRE,
    USBSTS_W1C,
    XECP,
)
from vmrun_xhci.usb import NAK, NO_ENDPOINT, STALL, UsbDevice

log = logging.getLogger("vmrun.xhci")

USB2_PORTS = 4
USB3_PORTS = 4
NPORTS = USB2_PORTS + USB3_PORTS
MAX_SLOTS = 16
NINTRS = 8
ERST_MAX = 4                 # log2: up to 16 event ring segments
TRB_BUDGET = 4096            # TRBs (links included) fetched per doorbell or wake-up
CMD_BUDGET = 1024            # commands run per command doorbell
LINK_LIMIT = 32              # consecutive Link TRBs before a ring counts as a loop
EVENT_QUEUE = 4096           # events held while an event ring is full; beyond: dropped
MAX_TRB_LEN = 0x10000
TRB = struct.Struct("<QII")
U64 = struct.Struct("<Q")

IDS = {   # pci_ids option -> (vendor, device, revision): controllers Linux and Windows know
    "qemu": (0x1B36, 0x000D, 0x01),      # QEMU's qemu-xhci
    "nec": (0x1033, 0x0194, 0x03),       # NEC/Renesas uPD720200, QEMU's nec-usb-xhci
}


class HostSystemError(Exception):
    """The controller cannot go on (guest memory it must reach is not there): HSE."""


class Cursor:
    """A consumer's place on a TRB ring: dequeue pointer and cycle state."""

    __slots__ = ("deq", "ccs")

    def __init__(self, deq: int, ccs: int) -> None:
        self.deq, self.ccs = deq, ccs


class Port:
    __slots__ = ("number", "usb3", "portsc", "pmsc", "li", "hlpmc", "device", "slot",
                 "wake_queued")

    def __init__(self, number: int, usb3: bool, device: UsbDevice | None) -> None:
        self.number, self.usb3, self.device = number, usb3, device
        self.slot: Slot | None = None
        self.wake_queued = False
        self.power_on()

    def power_on(self) -> None:
        self.pmsc = self.li = self.hlpmc = 0
        self.slot = None
        pls = PLS_RXDETECT
        self.portsc = PORTSC_PP
        if self.device is not None:
            pls = PLS_POLLING
            self.portsc |= PORTSC_CCS | PORTSC_CSC | self.device.speed << PORTSC_SPEED_SHIFT
        self.portsc |= pls << PORTSC_PLS_SHIFT

    @property
    def pls(self) -> int:
        return (self.portsc & PORTSC_PLS) >> PORTSC_PLS_SHIFT

    def set_pls(self, pls: int) -> None:
        self.portsc = (self.portsc & ~PORTSC_PLS) | pls << PORTSC_PLS_SHIFT


class Endpoint:
    __slots__ = ("dci", "type", "state", "deq", "dcs", "max_packet", "ctx", "pending_trb")

    def __init__(self, dci: int, ctx: list[int]) -> None:
        self.dci = dci
        self.ctx = ctx                      # the 5 dwords of its output context
        self.type = (ctx[1] >> 3) & 7
        self.max_packet = ctx[1] >> 16
        self.deq = (ctx[2] | ctx[3] << 32) & ~0xF
        self.dcs = ctx[2] & 1
        self.state = EP_RUNNING
        self.pending_trb: int | None = None   # a TD waits for the device (NAK)

    @property
    def address(self) -> int:
        """The USB endpoint address (number | 0x80 for IN)."""
        return self.dci >> 1 | (0x80 if self.dci & 1 else 0)

    @property
    def is_in(self) -> bool:
        return bool(self.dci & 1)


class Slot:
    __slots__ = ("id", "enabled", "state", "port", "ctx_addr", "ctx", "eps")

    def __init__(self, sid: int) -> None:
        self.id = sid
        self.enabled = False                # Enabled and Disabled share slot state 0
        self.state = SLOT_DISABLED_OR_ENABLED
        self.port: Port | None = None
        self.ctx_addr = 0                   # the output device context
        self.ctx = [0, 0, 0, 0]             # the output slot context's 4 dwords
        self.eps: dict[int, Endpoint] = {}


class Interrupter:
    __slots__ = ("index", "iman", "imod", "erstsz", "erstba", "erdp", "segments", "reload",
                 "seg", "idx", "pcs", "queue", "pending", "next_allowed", "timer", "dropped")

    def __init__(self, index: int) -> None:
        self.index = index
        self.timer = None
        self.reset()

    def reset(self) -> None:
        self.iman = 0
        self.imod = 4000                    # 1 ms, the reset value
        self.erstsz = self.erstba = self.erdp = 0
        self.segments: list[tuple[int, int]] | None = None
        self.reload = False
        self.seg = self.idx = 0
        self.pcs = 1
        self.queue: deque[tuple[int, int, int, bool]] = deque()
        self.pending = False
        self.next_allowed = 0.0
        self.dropped = 0

    def enqueue_address(self) -> int | None:
        if not self.segments:
            return None
        return self.segments[self.seg][0] + 16 * self.idx


class XhciController(PciDevice):
    """The PCI function: an xHCI controller with HID devices on its USB 2 ports."""

    class_code = 0x0C0330            # serial bus, USB, xHCI
    subsystem_vendor_id, subsystem_id = 0x1AF4, 0x1100
    interrupt_pin = 1
    name = "xhci"
    bars = [BarSpec(0, BAR_SIZE, BAR_MEM64)]
    msix_vectors, msix_bar = NINTRS, 2
    msi_vectors = 1
    capabilities_offset = 0x70       # SBRN and FLADJ live at 0x60

    def __init__(self, devices: list[UsbDevice] | None = None, context_size: int = 32,
                 scratchpads: int = 0, pci_ids: str = "qemu", input_hub=None) -> None:
        if len(devices or ()) > USB2_PORTS:
            raise ValueError(f"at most {USB2_PORTS} devices")
        self.vendor_id, self.device_id, self.revision = IDS[pci_ids]
        self.nec = pci_ids == "nec"
        self.csz = context_size
        self.scratchpads = scratchpads
        self.input_hub = input_hub
        self.usb_devices = list(devices or ())
        self.lock = threading.RLock()
        self.fladj = 0x20
        self.ports = [Port(i + 1, i >= USB2_PORTS,
                           self.usb_devices[i] if i < len(self.usb_devices) else None)
                      for i in range(NPORTS)]
        self.intrs = [Interrupter(i) for i in range(NINTRS)]
        self.slots = [Slot(i) for i in range(MAX_SLOTS + 1)]        # [0] unused
        self.stats = {"doorbells": 0, "commands": 0, "transfers": 0, "events": 0,
                      "interrupts": 0, "link_loops": 0, "budget_exhausted": 0, "hse": 0,
                      "faults": 0}
        self._budget = 0
        self.mfwrap_timer = None
        for port in self.ports:
            if port.device is not None:
                port.device.attach(partial(self._device_notify, port))
        self._reset_registers()

    # -- life cycle ---------------------------------------------------------------------------
    def realize(self) -> None:
        for port in self.ports:
            if port.device is not None:
                port.device.attach(partial(self._device_notify, port), self.loop)
        self.add_doorbell(0, DB, 4, partial(self._ring, 0, 0), datamatch=0)
        for sid in range(1, MAX_SLOTS + 1):
            for dci in (1, 3):      # endpoint 0 and endpoint 1 IN: the HID devices' traffic
                self.add_doorbell(0, DB + 4 * sid, 4, partial(self._ring, sid, dci),
                                  datamatch=dci)
        if self.input_hub is not None:
            for dev in self.usb_devices:
                self.input_hub.attach(dev)

    def reset(self) -> None:
        with self.lock:
            self.fladj = 0x20
            self._reset_registers()

    def close(self) -> None:
        if self.input_hub is not None:
            for dev in self.usb_devices:
                self.input_hub.detach(dev)
        for dev in self.usb_devices:
            dev.close()
        for intr in self.intrs:
            if intr.timer is not None:
                intr.timer.close()
                intr.timer = None
        if self.mfwrap_timer is not None:
            self.mfwrap_timer.close()
            self.mfwrap_timer = None

    def _reset_registers(self) -> None:
        """HCRST and power-on: registers, slots, interrupters, ports to their reset values."""
        self.usbcmd = 0
        self.usbsts = USBSTS_HCH
        self.dnctrl = 0
        self.crr = False
        self.cmd = Cursor(0, 0)
        self.crcr_lo = 0
        self.dcbaap = 0
        self.config_reg = 0
        self.broken = False
        self.mf_start = time.monotonic_ns()
        self.mf_stopped = 0
        for intr in self.intrs:
            if intr.timer is not None:
                intr.timer.cancel()
            intr.reset()
        for slot in self.slots:
            slot.__init__(slot.id)
        for port in self.ports:
            port.power_on()
            if port.device is not None:
                port.device.bus_reset()
        if self.mfwrap_timer is not None:
            self.mfwrap_timer.cancel()

    @property
    def running(self) -> bool:
        return bool(self.usbcmd & USBCMD_RS) and not self.usbsts & USBSTS_HCH

    # -- snapshots -----------------------------------------------------------------------------
    state_version = 1

    def device_state(self) -> dict:
        """The operational and runtime registers (MFINDEX as it reads now), the command
        ring's dequeue pointer and cycle state, every interrupter (ERST, the segments it
        loaded, its enqueue position and cycle, ERDP, events not yet written, the IMOD time
        left), port status and change bits, the enabled slots with the endpoint state the
        controller caches (transfer ring dequeue pointer and cycle, a TD waiting for the
        device), and each USB device's own state. Device contexts, rings and the event ring
        are guest RAM. Work queued on the loop (events from another thread) is done first."""
        if self.loop is not None:
            self.loop.sync()
        with self.lock:
            now = time.monotonic()
            intrs = [[i.iman, i.imod, i.erstsz, i.erstba, i.erdp,
                      None if i.segments is None else [list(s) for s in i.segments],
                      i.reload, i.seg, i.idx, i.pcs, [list(e) for e in i.queue], i.pending,
                      max(0.0, i.next_allowed - now)] for i in self.intrs]
            slots = [[s.id, s.enabled, s.state, s.port.number if s.port else 0, s.ctx_addr,
                      s.ctx, [[e.dci, e.state, e.deq, e.dcs, e.ctx, e.pending_trb]
                              for e in s.eps.values()]]
                     for s in self.slots[1:] if s.enabled or s.eps or s.state]
            return versioned(self.state_version, {
                "regs": [self.usbcmd, self.usbsts, self.dnctrl, self.crr, self.crcr_lo,
                         self.dcbaap, self.config_reg, self.broken, self.fladj,
                         self._mfindex()],
                "cmd": [self.cmd.deq, self.cmd.ccs], "intrs": intrs,
                "ports": [[p.portsc, p.pmsc, p.li, p.hlpmc] for p in self.ports],
                "slots": slots,
                "devices": [list(d.save_state().items()) for d in self.usb_devices]})

    def load_device_state(self, state: dict) -> None:
        """Into a fresh controller with the same devices; then the loop writes events that
        were queued, re-arms the MFINDEX wrap and IMOD timers, and looks at the IN
        endpoints (reports the devices hold)."""
        f = check_version(self.name, state, self.state_version)
        if len(f["devices"]) != len(self.usb_devices):
            raise ValueError(f"{self.name}: {len(f['devices'])} USB devices saved, "
                             f"{len(self.usb_devices)} here")
        with self.lock:
            (self.usbcmd, self.usbsts, self.dnctrl, self.crr, self.crcr_lo, self.dcbaap,
             self.config_reg, self.broken, self.fladj, mfindex) = f["regs"]
            self.mf_stopped = mfindex
            self.mf_start = time.monotonic_ns() - mfindex * 125_000
            self.cmd = Cursor(*f["cmd"])
            now = time.monotonic()
            for intr, v in zip(self.intrs, f["intrs"], strict=True):
                (intr.iman, intr.imod, intr.erstsz, intr.erstba, intr.erdp, segs, intr.reload,
                 intr.seg, intr.idx, intr.pcs, queue, intr.pending, left) = v
                intr.segments = None if segs is None else [tuple(s) for s in segs]
                intr.queue = deque(tuple(e) for e in queue)
                intr.next_allowed = now + left
            for port, regs in zip(self.ports, f["ports"], strict=True):
                port.portsc, port.pmsc, port.li, port.hlpmc = regs
                port.slot = None
            for slot in self.slots:
                slot.__init__(slot.id)
            for sid, enabled, sstate, portnum, ctx_addr, ctx, eps in f["slots"]:
                slot = self.slots[sid]
                slot.enabled, slot.state, slot.ctx_addr, slot.ctx = enabled, sstate, \
                    ctx_addr, list(ctx)
                if portnum:
                    slot.port = self.ports[portnum - 1]
                    slot.port.slot = slot
                for dci, estate, deq, dcs, ectx, pending in eps:
                    ep = Endpoint(dci, list(ectx))
                    ep.state, ep.deq, ep.dcs, ep.pending_trb = estate, deq, dcs, pending
                    slot.eps[dci] = ep
            for dev, fields in zip(self.usb_devices, f["devices"], strict=True):
                dev.load_state(dict(fields))
            if self.irq is not None and self.irq.mode == "intx" and \
                    self.usbcmd & USBCMD_INTE and \
                    any(i.iman & IMAN_IP and i.iman & IMAN_IE for i in self.intrs):
                self.irq.trigger(0)
        if self.loop is None:
            return
        self.loop.call_soon(self._guard, self._arm_mfwrap, owner=self)
        for intr in self.intrs:
            if intr.queue or intr.pending:
                self.loop.call_soon(self._guard, self._flush, intr, owner=self)
        for port in self.ports:
            if port.device is not None:
                self._device_notify(port)

    # -- PCI config: SBRN (USB 3.0) and FLADJ --------------------------------------------------
    def config_read(self, offset: int, size: int) -> int | None:
        if 0x60 <= offset < 0x64:
            regs = bytes([0x30, self.fladj, 0, 0])
            return int.from_bytes(regs[offset - 0x60:offset - 0x60 + size].ljust(size, b"\0"),
                                  "little")
        return None

    def config_write(self, offset: int, size: int, value: int) -> bool:
        if 0x60 <= offset < 0x64:
            if offset <= 0x61 < offset + size:
                self.fladj = (value >> 8 * (0x61 - offset)) & 0x3F
            return True
        return False

    # -- registers (vCPU threads) --------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        try:
            if size == 8:
                return self._read32(offset) | self._read32(offset + 4) << 32
            v = self._read32(offset & ~3) >> 8 * (offset & 3)
            return v & ((1 << 8 * size) - 1)
        except Exception as e:          # a bug must not reach the vCPU
            self.fault(f"register read at {offset:#x}: {type(e).__name__}: {e}")
            return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if offset >= DB:
            if size == 4 and offset < DB + 4 * (MAX_SLOTS + 1):
                self.loop.call_soon(self._ring, (offset - DB) >> 2, value, owner=self)
            return
        try:
            if size == 8:
                self._write32(offset, value & 0xFFFFFFFF)
                self._write32(offset + 4, value >> 32)
            elif size == 4 and not offset & 3:
                self._write32(offset, value & 0xFFFFFFFF)
        except Exception as e:
            self.fault(f"register write at {offset:#x}: {type(e).__name__}: {e}")

    def _read32(self, off: int) -> int:
        if off < 0x20:
            return self._cap_read(off)
        if off < CAPLENGTH:
            return self._xcap_read(off)
        with self.lock:
            if off < PORT_REGS:
                return self._op_read(off - OP)
            if off < PORT_REGS + 0x10 * NPORTS:
                port = self.ports[(off - PORT_REGS) >> 4]
                return (port.portsc, port.pmsc, port.li, port.hlpmc)[(off >> 2) & 3]
            if RT <= off < RT + 0x20 + 0x20 * NINTRS:
                return self._rt_read(off - RT)
        return 0

    def _cap_read(self, off: int) -> int:
        if off == 0x00:
            return CAPLENGTH | HCIVERSION << 16
        if off == 0x04:
            return MAX_SLOTS | NINTRS << 8 | NPORTS << 24
        if off == 0x08:   # IST 1 microframe, ERST Max, Max Scratchpad Buffers (hi, lo)
            sp = self.scratchpads
            return 1 | ERST_MAX << 4 | (sp >> 5) << 21 | (sp & 0x1F) << 27
        if off == 0x0C:
            return 0
        if off == 0x10:   # AC64, CSZ, NSS, xECP
            return 1 | (4 if self.csz == 64 else 0) | 1 << 7 | (XECP >> 2) << 16
        if off == 0x14:
            return DB
        if off == 0x18:
            return RT
        return 0          # HCCPARAMS2: nothing optional

    def _xcap_read(self, off: int) -> int:
        """Two Supported Protocol capabilities: USB 2.0 ports 1-4, USB 3.0 ports 5-8."""
        rel, which = (off - XECP) & 0xF, (off - XECP) >> 4
        if rel == 0:
            return 0x02 | (4 << 8 if which == 0 else 0) | (0x0200 if which == 0 else 0x0300) << 16
        if rel == 4:
            return 0x20425355    # "USB "
        if rel == 8:
            return (1 + USB2_PORTS * which) | (USB2_PORTS if which == 0 else USB3_PORTS) << 8
        return 0                 # protocol slot type 0

    def _op_read(self, off: int) -> int:
        if off == 0x00:
            return self.usbcmd
        if off == 0x04:
            return self.usbsts
        if off == 0x08:
            return 1             # 4 KiB pages
        if off == 0x14:
            return self.dnctrl
        if off == 0x18:
            return CRCR_CRR if self.crr else 0
        if off == 0x30:
            return self.dcbaap & 0xFFFFFFFF
        if off == 0x34:
            return self.dcbaap >> 32
        if off == 0x38:
            return self.config_reg
        return 0

    def _rt_read(self, off: int) -> int:
        if off == 0:
            return self._mfindex()
        if off < 0x20:
            return 0
        intr = self.intrs[(off - 0x20) >> 5]
        reg = (off - 0x20) & 0x1F
        if reg == 0x00:
            return intr.iman
        if reg == 0x04:
            return intr.imod
        if reg == 0x08:
            return intr.erstsz
        if reg == 0x10:
            return intr.erstba & 0xFFFFFFFF
        if reg == 0x14:
            return intr.erstba >> 32
        if reg == 0x18:
            return intr.erdp & 0xFFFFFFFF
        if reg == 0x1C:
            return intr.erdp >> 32
        return 0

    def _mfindex(self) -> int:
        if not self.running:
            return self.mf_stopped
        return ((time.monotonic_ns() - self.mf_start) // 125_000) & 0x3FFF

    def _write32(self, off: int, v: int) -> None:
        with self.lock:
            if OP <= off < PORT_REGS:
                self._op_write(off - OP, v)
            elif PORT_REGS <= off < PORT_REGS + 0x10 * NPORTS:
                port = self.ports[(off - PORT_REGS) >> 4]
                reg = (off >> 2) & 3
                if reg == 0:
                    self._portsc_write(port, v)
                elif reg == 1:
                    port.pmsc = v
                elif reg == 3:
                    port.hlpmc = v
            elif RT + 0x20 <= off < RT + 0x20 + 0x20 * NINTRS:
                self._intr_write(self.intrs[(off - RT - 0x20) >> 5], (off - RT) & 0x1F, v)

    def _op_write(self, off: int, v: int) -> None:
        if off == 0x00:
            self._usbcmd_write(v)
        elif off == 0x04:
            self.usbsts &= ~(v & USBSTS_W1C)
        elif off == 0x14:
            self.dnctrl = v & 0xFFFF
        elif off == 0x18:
            if self.crr:
                if v & (CRCR_CS | CRCR_CA):      # nothing is ever in flight: stop now
                    self.crr = False
                    self._post(0, self.cmd.deq, CC_CMD_RING_STOPPED << 24,
                               EV_CMD_COMPLETION << 10)
            else:
                self.crcr_lo = v
                self.cmd.deq = (self.cmd.deq & ~0xFFFFFFFF) | (v & 0xFFFFFFC0)
                self.cmd.ccs = v & 1
        elif off == 0x1C:
            if not self.crr:
                self.cmd.deq = (self.cmd.deq & 0xFFFFFFFF) | v << 32
        elif off == 0x30:
            self.dcbaap = (self.dcbaap & ~0xFFFFFFFF) | (v & 0xFFFFFFC0)
        elif off == 0x34:
            self.dcbaap = (self.dcbaap & 0xFFFFFFFF) | v << 32
        elif off == 0x38:
            self.config_reg = (v & 0x3FF & ~0xFF) | min(v & 0xFF, MAX_SLOTS)

    def _usbcmd_write(self, v: int) -> None:
        if v & USBCMD_HCRST:
            self._reset_registers()
            self.recover()
            self._update_intx()
            return
        old = self.usbcmd
        mfindex = self._mfindex()
        self.usbcmd = v & USBCMD_RW
        if v & USBCMD_RS and not old & USBCMD_RS and not self.broken:
            self.usbsts &= ~USBSTS_HCH
            self.mf_start = time.monotonic_ns() - self.mf_stopped * 125_000
            self.loop.call_soon(self._guard, self._started, owner=self)
        elif not v & USBCMD_RS and old & USBCMD_RS:
            self.mf_stopped = mfindex
            self.usbsts |= USBSTS_HCH
            self.crr = False
            if self.mfwrap_timer is not None:
                self.mfwrap_timer.cancel()
        elif v & USBCMD_RS and self.broken:
            self.usbcmd &= ~USBCMD_RS
        if v & USBCMD_CRS:
            self.usbsts |= USBSTS_SRE        # no saved state to restore: the driver re-inits
        if (v ^ old) & USBCMD_EWE and self.running:
            self.loop.call_soon(self._guard, self._arm_mfwrap, owner=self)
        self._update_intx()

    def _intr_write(self, intr: Interrupter, reg: int, v: int) -> None:
        if reg == 0x00:
            intr.iman = (intr.iman & ~(v & IMAN_IP) & ~IMAN_IE) | (v & IMAN_IE)
            self._update_intx()
            if intr.iman & IMAN_IE:
                self.loop.call_soon(self._guard, self._flush, intr, owner=self)
        elif reg == 0x04:
            intr.imod = v
            if v >> 16:      # IMODC: the counter, loaded with what the driver wrote
                intr.next_allowed = time.monotonic() + (v >> 16) * 250e-9
        elif reg == 0x08:
            intr.erstsz = v & 0xFFFF
        elif reg == 0x10:
            intr.erstba = (intr.erstba & ~0xFFFFFFFF) | (v & 0xFFFFFFC0)
        elif reg == 0x14:    # the high half completes the write: the ring starts over
            intr.erstba = (intr.erstba & 0xFFFFFFFF) | v << 32
            intr.reload = True
            intr.segments = None
        elif reg == 0x18:
            ehb = intr.erdp & ERDP_EHB and not v & ERDP_EHB
            intr.erdp = (intr.erdp & ~0xFFFFFFFF) | (v & 0xFFFFFFF7) | (ERDP_EHB if ehb else 0)
            self._erdp_moved(intr)
        elif reg == 0x1C:
            intr.erdp = (intr.erdp & 0xFFFFFFFF) | v << 32
            self._erdp_moved(intr)

    def _erdp_moved(self, intr: Interrupter) -> None:
        """Software consumed events: events still unread (or queued) interrupt again."""
        enq = intr.enqueue_address()
        intr.pending = bool(intr.queue) or enq is not None and intr.erdp & ~0xF != enq
        if intr.pending:         # else nothing to write or signal: the loop stays asleep
            self.loop.call_soon(self._guard, self._flush, intr, owner=self)

    def _portsc_write(self, port: Port, v: int) -> None:
        port.portsc &= ~(v & PORTSC_CHANGE)
        port.portsc = (port.portsc & ~PORTSC_RWS) | (v & PORTSC_RWS)
        if v & PORTSC_PED and port.portsc & PORTSC_PED:        # write 1: disable the port
            port.portsc &= ~PORTSC_PED
            port.set_pls(PLS_POLLING if not port.usb3 else 4)
        if v & PORTSC_LWS and port.portsc & PORTSC_PED:
            self._link_state_write(port, (v & PORTSC_PLS) >> PORTSC_PLS_SHIFT)
        if v & (PORTSC_PR | PORTSC_WPR) and port.portsc & PORTSC_CCS and port.device:
            port.device.bus_reset()
            port.portsc = (port.portsc & ~PORTSC_SPEED) | PORTSC_PED | \
                port.device.speed << PORTSC_SPEED_SHIFT
            port.set_pls(PLS_U0)
            bits = PORTSC_PRC | (PORTSC_WRC if v & PORTSC_WPR and port.usb3 else 0)
            self._port_change(port, bits)

    def _link_state_write(self, port: Port, pls: int) -> None:
        old = port.pls
        if pls == PLS_U3:
            port.set_pls(PLS_U3)
        elif pls == PLS_RESUME and not port.usb3 and old == PLS_U3:
            port.set_pls(PLS_RESUME)
        elif pls == PLS_U0 and old != PLS_U0:
            port.set_pls(PLS_U0)
            self._port_change(port, PORTSC_PLC)
            if port.device is not None:      # input that waited while suspended
                self._device_notify(port)

    def _port_change(self, port: Port, bits: int) -> None:
        """Set change bits; a bit going 0 -> 1 posts a Port Status Change Event."""
        new = bits & ~port.portsc
        port.portsc |= bits
        if new:
            self.usbsts |= USBSTS_PCD
            if self.running:
                self._post(0, port.number << 24, CC_SUCCESS << 24, EV_PORT_STATUS << 10)

    # -- the event loop: guard, start, doorbells ------------------------------------------------
    def _guard(self, fn: Callable, *args) -> None:
        """Run loop work under the lock; guest memory the controller cannot reach is HSE."""
        with self.lock:
            if self.broken:
                return
            try:
                fn(*args)
            except (GuestError, HostSystemError) as e:
                self._host_system_error(str(e))

    def _host_system_error(self, reason: str) -> None:
        if not self.broken:
            log.warning("%s: host system error: %s: halted until reset", self.name, reason)
        self.stats["hse"] += 1
        self.broken = True
        self.usbsts |= USBSTS_HSE | USBSTS_HCH
        self.usbcmd &= ~USBCMD_RS
        self.crr = False

    def fault(self, reason: str) -> None:
        """An internal error: the controller halts with HSE (the driver's HCRST recovers)."""
        log.error("%s: %s", self.name, reason)
        self.stats["faults"] += 1
        with self.lock:
            self._host_system_error(reason)

    def _started(self) -> None:
        """R/S went to 1: check the scratchpad buffers the driver handed over."""
        if self.scratchpads:
            array = U64.unpack(self.dma.read(self.dcbaap, 8))[0] & ~0x3F
            raw = self.dma.read(array, 8 * self.scratchpads)
            for (ptr,) in U64.iter_unpack(raw):
                if ptr & 0xFFF:
                    raise HostSystemError(f"scratchpad buffer {ptr:#x} is not page-aligned")
                self.dma.sg([(ptr, 4096)])
        self._arm_mfwrap()

    def _arm_mfwrap(self) -> None:
        if self.usbcmd & USBCMD_EWE and self.running:
            if self.mfwrap_timer is None:
                self.mfwrap_timer = self.loop.timer(partial(self._guard, self._mfwrap), self)
            left = (0x4000 - self._mfindex()) * 125e-6
            self.mfwrap_timer.arm(left, 0x4000 * 125e-6)
        elif self.mfwrap_timer is not None:
            self.mfwrap_timer.cancel()

    def _mfwrap(self) -> None:
        if self.running and self.usbcmd & USBCMD_EWE:
            self._post(0, 0, CC_SUCCESS << 24, EV_MFINDEX_WRAP << 10)

    def _ring(self, target: int, value: int) -> None:
        """A doorbell: 0 is the command ring, 1..MaxSlots a slot's endpoint ``value``."""
        self._guard(self._ring_locked, target, value)

    def _ring_locked(self, target: int, value: int) -> None:
        self.stats["doorbells"] += 1
        if not self.running:
            return
        if target == 0:
            if value & 0xFF == 0:
                self._run_commands()
            return
        if target > MAX_SLOTS:
            return
        slot = self.slots[target]
        ep = slot.eps.get(value & 0xFF)
        if ep is None:
            return
        if ep.state == EP_STOPPED:
            ep.state = EP_RUNNING
            self._write_ep(slot, ep)
        self._kick(slot, ep)

    def _device_notify(self, port: Port) -> None:
        """A device has input (any thread): its IN endpoints are served on the loop."""
        if port.wake_queued or self.loop is None:
            return
        port.wake_queued = True
        self.loop.call_soon(self._guard, self._device_wakeup, port, owner=self)

    def _device_wakeup(self, port: Port) -> None:
        port.wake_queued = False
        if not self.running or port.slot is None:
            return
        if port.pls == PLS_U3:               # suspended: remote wake-up if allowed
            if port.device is not None and port.device.remote_wakeup and not port.usb3:
                port.set_pls(PLS_RESUME)
                self._port_change(port, PORTSC_PLC)
            return
        for ep in list(port.slot.eps.values()):
            if ep.is_in and ep.dci > 1 and ep.state == EP_RUNNING:
                self._kick(port.slot, ep)

    # -- TRB rings ------------------------------------------------------------------------------
    def _fetch(self, cur: Cursor) -> tuple[int, int, int, int] | None:
        """The TRB at ``cur`` if the consumer owns it (Link TRBs followed), else None."""
        links = 0
        while True:
            if self._budget <= 0:
                self.stats["budget_exhausted"] += 1
                return None
            self._budget -= 1
            addr = cur.deq
            param, status, control = TRB.unpack(self.dma.read(addr, 16))
            if control & 1 != cur.ccs:
                return None
            if (control >> 10) & 0x3F != TRB_LINK:
                return addr, param, status, control
            links += 1
            if links > LINK_LIMIT:
                self.stats["link_loops"] += 1
                return None
            if control & TRB_TC:
                cur.ccs ^= 1
            cur.deq = param & ~0xF

    # -- events and interrupts ------------------------------------------------------------------
    def _post(self, index: int, param: int, status: int, control: int,
              interrupt: bool = True) -> None:
        """Queue an event (cycle bit added when written) and write what fits."""
        intr = self.intrs[index if index < NINTRS else 0]
        if len(intr.queue) >= EVENT_QUEUE:
            intr.dropped += 1
            return
        intr.queue.append((param, status, control, interrupt))
        if self.loop is not None and self.loop.on_loop_thread:
            self._flush(intr)
        elif self.loop is not None:
            self.loop.call_soon(self._guard, self._flush, intr, owner=self)

    def _load_erst(self, intr: Interrupter) -> None:
        intr.reload = False
        n = intr.erstsz
        segments: list[tuple[int, int]] = []
        if 0 < n <= 1 << ERST_MAX:
            raw = self.dma.read(intr.erstba, 16 * n)
            for i in range(n):
                base, size = struct.unpack_from("<QI", raw, 16 * i)
                base &= ~0x3F
                if not 16 <= size & 0xFFFF <= 4096:
                    segments = []
                    break
                self.dma.sg([(base, 16 * (size & 0xFFFF))])      # inside RAM, or HSE
                segments.append((base, size & 0xFFFF))
        intr.segments = segments
        intr.seg = intr.idx = 0
        intr.pcs = 1

    def _dequeue_index(self, intr: Interrupter) -> int | None:
        """ERDP as an index into the ring (None: it points outside every segment)."""
        deq = intr.erdp & ~0xF
        before = 0
        for base, size in intr.segments or ():
            if base <= deq < base + 16 * size:
                return before + (deq - base) // 16
            before += size
        return None

    def _flush(self, intr: Interrupter) -> None:
        """Write queued events into the event ring while it has room; then interrupt."""
        if intr.queue and self.running:
            if intr.reload or intr.segments is None:
                self._load_erst(intr)
            if not intr.segments:
                raise HostSystemError(f"interrupter {intr.index} has no valid event ring")
            capacity = sum(size for _, size in intr.segments)
            deq = self._dequeue_index(intr)
            enq = sum(size for _, size in intr.segments[:intr.seg]) + intr.idx
            while intr.queue:
                if deq is not None and (enq + 1) % capacity == deq:
                    break                     # full: the rest waits for the next ERDP write
                param, status, control, interrupt = intr.queue.popleft()
                addr = intr.segments[intr.seg][0] + 16 * intr.idx
                self.dma.write(addr, struct.pack("<QI", param, status))
                self.dma.write(addr + 12, struct.pack("<I", control | intr.pcs))
                self.stats["events"] += 1
                intr.pending |= interrupt
                intr.idx += 1
                enq = (enq + 1) % capacity
                if intr.idx == intr.segments[intr.seg][1]:
                    intr.idx = 0
                    intr.seg += 1
                    if intr.seg == len(intr.segments):
                        intr.seg = 0
                        intr.pcs ^= 1
        self._try_interrupt(intr)

    def _try_interrupt(self, intr: Interrupter) -> None:
        """Assert the interrupter if something is pending, EHB is clear and IMOD allows."""
        if not intr.pending or intr.erdp & ERDP_EHB or not self.running:
            return
        now = time.monotonic()
        if now < intr.next_allowed:
            if intr.timer is None:
                intr.timer = self.loop.timer(partial(self._guard, self._try_interrupt, intr),
                                             self)
            intr.timer.arm(intr.next_allowed - now)
            return
        intr.pending = False
        intr.iman |= IMAN_IP
        intr.erdp |= ERDP_EHB
        self.usbsts |= USBSTS_EINT
        intr.next_allowed = now + (intr.imod & 0xFFFF) * 250e-9
        if intr.iman & IMAN_IE and self.usbcmd & USBCMD_INTE and self.irq is not None:
            self.stats["interrupts"] += 1
            self.irq.trigger(intr.index)

    def _update_intx(self) -> None:
        """INTx is a level: lowered once no enabled interrupter has IP (or INTE is off)."""
        if self.irq is None or self.irq.mode != "intx":
            return
        if not (self.usbcmd & USBCMD_INTE and
                any(i.iman & IMAN_IP and i.iman & IMAN_IE for i in self.intrs)):
            self.irq.deassert()

    def _transfer_event(self, slot: Slot, ep: Endpoint, trb: tuple[int, int, int, int],
                        cc: int, residual: int, ed: bool = False) -> None:
        addr, param, status, control = trb
        self._post(status >> 22, param if ed else addr, cc << 24 | (residual & 0xFFFFFF),
                   slot.id << 24 | ep.dci << 16 | EV_TRANSFER << 10 | (EVENT_ED if ed else 0),
                   interrupt=not control & (1 << 9))

    # -- commands -------------------------------------------------------------------------------
    def _run_commands(self) -> None:
        self.crr = True
        self._budget = CMD_BUDGET + LINK_LIMIT
        for _ in range(CMD_BUDGET):
            if not self.crr or not self.running:
                return
            trb = self._fetch(self.cmd)
            if trb is None:
                return
            self.cmd.deq += 16
            self.stats["commands"] += 1
            addr, param, status, control = trb
            kind = (control >> 10) & 0x3F
            cc, slot_id = self._command(kind, param, status, control)
            if kind == CMD_NEC_GET_FW and self.nec:
                self._post(0, addr, CC_SUCCESS << 24 | 0x3025, EV_NEC_CMD_COMPLETION << 10)
                continue
            self._post(0, addr, cc << 24, slot_id << 24 | EV_CMD_COMPLETION << 10)

    def _command(self, kind: int, param: int, status: int, control: int) -> tuple[int, int]:
        """Run one command: (completion code, slot ID for the event)."""
        sid = control >> 24
        if kind == CMD_NOOP:
            return CC_SUCCESS, 0
        if kind == CMD_ENABLE_SLOT:
            for slot in self.slots[1:min(self.config_reg & 0xFF, MAX_SLOTS) + 1]:
                if not slot.enabled:
                    slot.enabled = True
                    return CC_SUCCESS, slot.id
            return CC_NO_SLOTS, 0
        if kind not in (CMD_DISABLE_SLOT, CMD_ADDRESS_DEVICE, CMD_CONFIGURE_EP,
                        CMD_EVALUATE_CTX, CMD_RESET_EP, CMD_STOP_EP, CMD_SET_TR_DEQ,
                        CMD_RESET_DEVICE):
            return CC_TRB, 0
        if not 1 <= sid <= MAX_SLOTS:
            return CC_TRB, sid
        slot = self.slots[sid]
        if not slot.enabled:
            return CC_SLOT_NOT_ENABLED, sid
        if kind == CMD_DISABLE_SLOT:
            self._disable_slot(slot)
            return CC_SUCCESS, sid
        if kind == CMD_ADDRESS_DEVICE:
            return self._address_device(slot, param & ~0xF, bool(control & TRB_BSR)), sid
        if kind == CMD_CONFIGURE_EP:
            return self._configure_endpoint(slot, param & ~0xF, bool(control & TRB_DC)), sid
        if kind == CMD_EVALUATE_CTX:
            return self._evaluate_context(slot, param & ~0xF), sid
        if kind == CMD_RESET_DEVICE:
            return self._reset_device(slot), sid
        dci = (control >> 16) & 0x1F
        if dci == 0:
            return CC_TRB, sid
        ep = slot.eps.get(dci)
        if ep is None:
            return CC_EP_NOT_ENABLED, sid
        if kind == CMD_RESET_EP:
            if ep.state != EP_HALTED:
                return CC_CONTEXT_STATE, sid
            ep.state = EP_STOPPED
        elif kind == CMD_STOP_EP:
            if ep.state != EP_RUNNING:
                return CC_CONTEXT_STATE, sid
            if ep.pending_trb is not None:     # the TD the device was NAKing
                self._transfer_event(slot, ep, (ep.pending_trb, 0, 0, 0),
                                     CC_STOPPED_LENGTH_INVALID, 0)
                ep.pending_trb = None
            ep.state = EP_STOPPED
        else:   # CMD_SET_TR_DEQ
            if ep.state not in (EP_STOPPED, EP_ERROR):
                return CC_CONTEXT_STATE, sid
            ep.deq, ep.dcs = param & ~0xF, param & 1
            ep.pending_trb = None
        self._write_ep(slot, ep)
        return CC_SUCCESS, sid

    def _disable_slot(self, slot: Slot) -> None:
        if slot.port is not None and slot.port.slot is slot:
            slot.port.slot = None
        slot.__init__(slot.id)

    def _read_dwords(self, addr: int, n: int) -> list[int]:
        return list(struct.unpack(f"<{n}I", self.dma.read(addr, 4 * n)))

    def _input_context(self, ictx: int) -> tuple[int, int]:
        drop, add = struct.unpack("<II", self.dma.read(ictx, 8))
        return drop, add

    def _address_device(self, slot: Slot, ictx: int, bsr: bool) -> int:
        if slot.state in (SLOT_ADDRESSED, SLOT_CONFIGURED) or slot.state == SLOT_DEFAULT and bsr:
            return CC_CONTEXT_STATE
        drop, add = self._input_context(ictx)
        if add & 3 != 3:
            return CC_PARAMETER
        sctx = self._read_dwords(ictx + self.csz, 4)
        ep0 = self._read_dwords(ictx + 2 * self.csz, 5)
        number = (sctx[1] >> 16) & 0xFF
        if not 1 <= number <= NPORTS:
            return CC_PARAMETER
        if (ep0[1] >> 3) & 7 != EPT_CONTROL or ep0[1] >> 16 == 0:
            return CC_PARAMETER
        port = self.ports[number - 1]
        if sctx[0] & 0xFFFFF or port.device is None or not port.portsc & PORTSC_PED:
            return CC_TRANSACTION          # no hubs: nothing answers on that route
        other = port.slot
        if other is not None and other is not slot and other.state >= SLOT_ADDRESSED:
            return CC_TRANSACTION          # the device is at another address already
        out = U64.unpack(self.dma.read(self.dcbaap + 8 * slot.id, 8))[0] & ~0x3F
        self.dma.sg([(out, 32 * self.csz)])                # the output context is in RAM
        if other is not None and other is not slot:
            other.port = None
        slot.port, port.slot, slot.ctx_addr = port, slot, out
        if bsr:
            slot.state, address = SLOT_DEFAULT, 0
        else:
            port.device.set_address(slot.id)
            slot.state, address = SLOT_ADDRESSED, slot.id
        slot.ctx = [sctx[0], sctx[1], sctx[2], slot.state << 27 | address]
        slot.eps = {1: Endpoint(1, ep0)}
        self._write_slot(slot)
        self._write_ep(slot, slot.eps[1])
        return CC_SUCCESS

    def _configure_endpoint(self, slot: Slot, ictx: int, deconfigure: bool) -> int:
        if slot.state not in (SLOT_ADDRESSED, SLOT_CONFIGURED):
            return CC_CONTEXT_STATE
        if deconfigure:
            for dci in [d for d in slot.eps if d > 1]:
                self._drop_ep(slot, dci)
            slot.state = SLOT_ADDRESSED
            slot.ctx[0] = (slot.ctx[0] & 0x07FFFFFF) | 1 << 27
            self._write_slot(slot)
            return CC_SUCCESS
        drop, add = self._input_context(ictx)
        new: dict[int, Endpoint] = {}
        for dci in range(2, 32):
            if not add & 1 << dci:
                continue
            ctx = self._read_dwords(ictx + (dci + 1) * self.csz, 5)
            ept, mps = (ctx[1] >> 3) & 7, ctx[1] >> 16
            if ept == 0 or mps == 0 or (ctx[0] >> 10) & 0x1F or \
                    (not dci & 1 if ept == EPT_CONTROL else bool(dci & 1) != (ept >= 5)):
                return CC_PARAMETER
            new[dci] = Endpoint(dci, ctx)
        for dci in range(2, 32):
            if drop & 1 << dci and dci in slot.eps:
                self._drop_ep(slot, dci)
        for dci, ep in new.items():
            slot.eps[dci] = ep
            self._write_ep(slot, ep)
        if add & 1:
            entries = self._read_dwords(ictx + self.csz, 1)[0] >> 27
            slot.ctx[0] = (slot.ctx[0] & 0x07FFFFFF) | entries << 27
        slot.state = SLOT_CONFIGURED if len(slot.eps) > 1 else SLOT_ADDRESSED
        self._write_slot(slot)
        return CC_SUCCESS

    def _drop_ep(self, slot: Slot, dci: int) -> None:
        ep = slot.eps.pop(dci)
        ep.state = EP_DISABLED
        self._write_ep(slot, ep)

    def _evaluate_context(self, slot: Slot, ictx: int) -> int:
        if slot.state == SLOT_DISABLED_OR_ENABLED:
            return CC_CONTEXT_STATE
        drop, add = self._input_context(ictx)
        if add & 1:
            sctx = self._read_dwords(ictx + self.csz, 4)
            slot.ctx[1] = (slot.ctx[1] & ~0xFFFF) | (sctx[1] & 0xFFFF)      # max exit latency
            slot.ctx[2] = (slot.ctx[2] & 0x003FFFFF) | (sctx[2] & 0xFFC00000)  # interrupter
            self._write_slot(slot)
        if add & 2 and 1 in slot.eps:
            ep0 = slot.eps[1]
            mps = self._read_dwords(ictx + 2 * self.csz, 2)[1] >> 16
            if mps == 0:
                return CC_PARAMETER
            ep0.max_packet = mps
            ep0.ctx[1] = (ep0.ctx[1] & 0xFFFF) | mps << 16
            self._write_ep(slot, ep0)
        return CC_SUCCESS

    def _reset_device(self, slot: Slot) -> int:
        if slot.state not in (SLOT_ADDRESSED, SLOT_CONFIGURED):
            return CC_CONTEXT_STATE
        for dci in [d for d in slot.eps if d > 1]:
            self._drop_ep(slot, dci)
        slot.state = SLOT_DEFAULT
        slot.ctx[0] = (slot.ctx[0] & 0x07FFFFFF) | 1 << 27
        slot.ctx[3] = SLOT_DEFAULT << 27
        self._write_slot(slot)
        return CC_SUCCESS

    def _write_slot(self, slot: Slot) -> None:
        slot.ctx[3] = (slot.ctx[3] & 0x07FFFFFF) | slot.state << 27
        self.dma.write(slot.ctx_addr, struct.pack("<4I", *slot.ctx))

    def _write_ep(self, slot: Slot, ep: Endpoint) -> None:
        ctx = ep.ctx
        ctx[0] = (ctx[0] & ~7) | ep.state
        ctx[2] = (ep.deq & 0xFFFFFFF0) | ep.dcs
        ctx[3] = ep.deq >> 32
        if slot.ctx_addr:
            self.dma.write(slot.ctx_addr + ep.dci * self.csz, struct.pack("<5I", *ctx))

    # -- transfers ------------------------------------------------------------------------------
    def _kick(self, slot: Slot, ep: Endpoint) -> None:
        """Run the endpoint's TDs until its ring is empty, a TD waits, or it halts."""
        self._budget = TRB_BUDGET
        while ep.state == EP_RUNNING and slot.eps.get(ep.dci) is ep:
            if ep.dci == 1 or ep.type == EPT_CONTROL:
                done = self._control_td(slot, ep)
            else:
                done = self._normal_td(slot, ep)
            if not done:
                return

    def _halt(self, slot: Slot, ep: Endpoint, trb, cc: int, residual: int = 0) -> bool:
        self._transfer_event(slot, ep, trb, cc, residual)
        ep.state = EP_HALTED
        ep.pending_trb = None
        self._write_ep(slot, ep)
        return False

    def _device(self, slot: Slot) -> UsbDevice | None:
        port = slot.port
        if port is None or port.device is None or not port.portsc & PORTSC_PED:
            return None
        return port.device

    def _chain(self, cur: Cursor, first: tuple[int, int, int, int]) -> list | None:
        """``first`` and the TRBs chained to it (CH); None while the chain is incomplete."""
        trbs = [first]
        t = first
        while t[3] & TRB_CH:
            t = self._fetch(cur)
            if t is None:
                return None
            cur.deq += 16
            trbs.append(t)
        return trbs

    @staticmethod
    def _type(trb) -> int:
        return (trb[3] >> 10) & 0x3F

    def _control_td(self, slot: Slot, ep: Endpoint) -> bool:
        cur = Cursor(ep.deq, ep.dcs)
        setup = self._fetch(cur)
        if setup is None:
            return False
        cur.deq += 16
        kind = self._type(setup)
        if kind == TRB_NOOP:
            return self._finish_noop(slot, ep, cur, setup)
        if kind != TRB_SETUP or not setup[3] & TRB_IDT or setup[2] & 0x1FFFF != 8:
            return self._halt(slot, ep, setup, CC_TRB)
        data: list = []
        t = self._fetch(cur)
        if t is None:
            return False
        cur.deq += 16
        if self._type(t) == TRB_DATA:
            chain = self._chain(cur, t)
            if chain is None:
                return False
            data = chain
            t = self._fetch(cur)
            if t is None:
                return False
            cur.deq += 16
        if self._type(t) != TRB_STATUS:
            return self._halt(slot, ep, t, CC_TRB)
        status = self._chain(cur, t)
        if status is None:
            return False
        bad = self._check_buffers(data, TRB_DATA)
        if bad is not None:
            return self._halt(slot, ep, bad, CC_TRB)
        dev = self._device(slot)
        if dev is None:
            return self._halt(slot, ep, setup, CC_TRANSACTION)
        self.stats["transfers"] += 1
        request = struct.pack("<Q", setup[1])
        into = bool(data and data[0][3] & TRB_DIR_IN)
        if setup[3] & TRB_IOC:
            self._transfer_event(slot, ep, setup, CC_SUCCESS, 0)
        if into:
            resp = dev.control(request, None)
            if resp is STALL:
                return self._halt(slot, ep, data[0], CC_STALL)
            self._data_events(slot, ep, data, self._scatter(data, resp))
        else:
            out = self._gather(data) if data else b""
            resp = dev.control(request, out)
            if resp is STALL:
                return self._halt(slot, ep, data[0] if data else status[0], CC_STALL)
            if data:
                self._data_events(slot, ep, data, len(out))
        for t in status:                     # the Status TRB, then any chained Event Data
            if t[3] & TRB_IOC:
                self._transfer_event(slot, ep, t, CC_SUCCESS, 0,
                                     ed=self._type(t) == TRB_EVENT_DATA)
        ep.deq, ep.dcs = cur.deq, cur.ccs
        return True

    def _finish_noop(self, slot: Slot, ep: Endpoint, cur: Cursor, trb) -> bool:
        if trb[3] & TRB_IOC:
            self._transfer_event(slot, ep, trb, CC_SUCCESS, 0)
        ep.deq, ep.dcs = cur.deq, cur.ccs
        return True

    def _normal_td(self, slot: Slot, ep: Endpoint) -> bool:
        cur = Cursor(ep.deq, ep.dcs)
        first = self._fetch(cur)
        if first is None:
            return False
        cur.deq += 16
        if self._type(first) == TRB_NOOP and not first[3] & TRB_CH:
            return self._finish_noop(slot, ep, cur, first)
        trbs = self._chain(cur, first)
        if trbs is None:
            return False
        bad = self._check_buffers(trbs, TRB_NORMAL, allow_idt=not ep.is_in)
        if bad is not None or ep.type in (EPT_ISOCH_IN, EPT_ISOCH_OUT):
            return self._halt(slot, ep, bad or first, CC_TRB)
        dev = self._device(slot)
        if dev is None:
            return self._halt(slot, ep, first, CC_TRANSACTION)
        if slot.port is not None and slot.port.pls == PLS_U3:
            return False                     # suspended: the TD waits for the resume
        if ep.is_in:
            want = sum(t[2] & 0x1FFFF for t in trbs if self._type(t) == TRB_NORMAL)
            resp = dev.data_in(ep.address, want) if want else b""
        else:
            resp = dev.data_out(ep.address, self._gather(trbs))
        if resp == NAK:
            ep.pending_trb = first[0]
            return False
        if resp is STALL:
            return self._halt(slot, ep, first, CC_STALL)
        if resp == NO_ENDPOINT:
            return self._halt(slot, ep, first, CC_TRANSACTION)
        self.stats["transfers"] += 1
        ep.pending_trb = None
        if ep.is_in:
            got = self._scatter(trbs, resp)      # type: ignore[arg-type]
        else:
            got = sum(t[2] & 0x1FFFF for t in trbs if self._type(t) == TRB_NORMAL)
        self._data_events(slot, ep, trbs, got)
        ep.deq, ep.dcs = cur.deq, cur.ccs
        return True

    def _check_buffers(self, trbs: list, first_type: int, allow_idt: bool = True):
        """The first TRB of a data chain that is malformed, or None."""
        for i, t in enumerate(trbs):
            kind = self._type(t)
            if kind == TRB_EVENT_DATA or kind == TRB_NOOP:
                continue
            if kind != (first_type if i == 0 else TRB_NORMAL):
                return t
            length = t[2] & 0x1FFFF
            if length > MAX_TRB_LEN:
                return t
            if t[3] & TRB_IDT and (not allow_idt or length > 8):
                return t
        return None

    def _scatter(self, trbs: list, data: bytes) -> int:
        """Write ``data`` into the chain's buffers; the bytes that fitted."""
        pos = 0
        for t in trbs:
            if self._type(t) in (TRB_EVENT_DATA, TRB_NOOP) or pos >= len(data):
                continue
            length = t[2] & 0x1FFFF
            piece = data[pos:pos + length]
            if piece:
                self.dma.write(t[1], piece)
                pos += len(piece)
        return pos

    def _gather(self, trbs: list) -> bytes:
        out = []
        for t in trbs:
            if self._type(t) in (TRB_EVENT_DATA, TRB_NOOP):
                continue
            length = t[2] & 0x1FFFF
            if t[3] & TRB_IDT:
                out.append(struct.pack("<Q", t[1])[:length])
            elif length:
                out.append(self.dma.read(t[1], length))
        return b"".join(out)

    def _data_events(self, slot: Slot, ep: Endpoint, trbs: list, got: int) -> None:
        """Transfer events for a chain of which ``got`` bytes moved: Short Packet on the
        first TRB after the short point with ISP or IOC, Success on IOC TRBs before it, and
        Event Data TRBs with the bytes moved since the previous one (EDTLA)."""
        want = sum(t[2] & 0x1FFFF for t in trbs if self._type(t) not in (TRB_EVENT_DATA,
                                                                          TRB_NOOP))
        short = got < want
        left, edtla, reported = got, 0, False
        for t in trbs:
            kind = self._type(t)
            if kind == TRB_EVENT_DATA:
                if t[3] & TRB_IOC:
                    self._transfer_event(slot, ep, t, CC_SHORT_PACKET if short else CC_SUCCESS,
                                         edtla, ed=True)
                edtla = 0
                continue
            length = 0 if kind == TRB_NOOP else t[2] & 0x1FFFF
            n = min(length, left)
            left -= n
            edtla += n
            if reported:
                continue
            if short and n < length:
                if t[3] & (TRB_ISP | TRB_IOC):
                    self._transfer_event(slot, ep, t, CC_SHORT_PACKET, length - n)
                    reported = True
            elif t[3] & TRB_IOC:
                self._transfer_event(slot, ep, t, CC_SUCCESS, 0)
