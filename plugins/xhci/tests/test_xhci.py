"""The xHCI controller and its HID devices, driven by the mock xHCI driver on fake memory.

Everything a driver does to enumerate and use a tablet and a keyboard (reset, run, port
reset, Enable Slot, Address Device with and without BSR, Configure Endpoint, control
transfers, interrupt IN TDs fed from the input hub), the commands' error paths with their
completion codes, PORTSC's write-1-to-clear bits, the event ring (segments, wrap, full),
interrupts (MSI-X, INTx, moderation), host system errors and recovery, scratchpads, and the
plugin's registration.
"""

from __future__ import annotations

import struct
import time

import pytest
from vmrun_xhci import plugin
from vmrun_xhci.controller import TRB_BUDGET, XhciController
from vmrun_xhci.hid import (
    EVDEV_TO_HID,
    KEYBOARD_REPORT_DESCRIPTOR,
    TABLET_REPORT_DESCRIPTOR,
    HidKeyboard,
    HidTablet,
)
from vmrun_xhci.spec import (
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
    CMD_DISABLE_SLOT,
    CMD_EVALUATE_CTX,
    CMD_NEC_GET_FW,
    CMD_NOOP,
    CMD_RESET_DEVICE,
    CMD_RESET_EP,
    CMD_SET_TR_DEQ,
    CMD_STOP_EP,
    EP_HALTED,
    EP_RUNNING,
    EP_STOPPED,
    PORTSC_CCS,
    PORTSC_CSC,
    PORTSC_PED,
    PORTSC_PP,
    PORTSC_PRC,
    SLOT_ADDRESSED,
    SLOT_CONFIGURED,
    SLOT_DEFAULT,
    USBSTS_HSE,
)

from vmrun.core.input import ABS_MAX, InputHub
from vmrun.plugins.registry import DeviceContext, validate_options
from vmrun.testing import FakeVm, PciDriver
from vmrun.testing.xhci_driver import (
    COMMAND_COMPLETION,
    NORMAL,
    PORT_STATUS_CHANGE,
    TRANSFER_EVENT,
    XhciDriver,
)

SLOT = 5
KEY_A, KEY_LEFTSHIFT, KEY_CAPSLOCK = 30, 42, 58


class Rig:
    def __init__(self, devices=("tablet", "keyboard"), **opts) -> None:
        self.vm = FakeVm()
        self.hub = InputHub()
        self.tablet, self.keyboard = HidTablet(), HidKeyboard()
        devs = [{"tablet": self.tablet, "keyboard": self.keyboard}[d] for d in devices]
        self.dev = XhciController(devs, input_hub=self.hub, **opts)
        self.vm.pci.add(self.dev, SLOT)
        self.vm.pci.assign_bars()
        self.drv = XhciDriver(self.vm, SLOT)

    def close(self) -> None:
        self.dev.close()
        self.vm.close()


@pytest.fixture
def rig():
    r = Rig()
    r.drv.start()
    yield r
    assert r.vm.loop.faults == []
    r.close()


@pytest.fixture(params=[32, 64])
def any_csz(request):
    r = Rig(context_size=request.param)
    r.drv.start()
    yield r
    assert r.vm.loop.faults == []
    r.close()


def _u32(mem, addr):
    return struct.unpack("<I", mem.read(addr, 4))[0]


# -- identity and registers ---------------------------------------------------------------------
def test_pci_identity_capabilities_and_sbrn() -> None:
    r = Rig()
    pci = PciDriver(r.vm)
    assert pci.read(SLOT, 0, 0) == 0x000D1B36
    assert pci.read(SLOT, 0, 8) >> 8 == 0x0C0330
    assert pci.read(SLOT, 0, 0x60, 1) == 0x30                 # SBRN: USB 3.0
    assert pci.read(SLOT, 0, 0x61, 1) == 0x20                 # FLADJ
    caps = dict((cid, off) for off, cid in pci.capabilities(SLOT, 0))
    assert caps[0x11] >= 0x70 and caps[0x05] >= 0x70          # MSI-X, MSI past 0x60
    assert pci.bar_size(SLOT, 0, 0) == 0x4000
    r.close()
    nec = Rig(pci_ids="nec")
    assert PciDriver(nec.vm).read(SLOT, 0, 0) == 0x01941033
    nec.close()


def test_capability_registers_and_supported_protocols(rig: Rig) -> None:
    d = rig.drv
    assert d.read(0) == 0x01100040                            # xHCI 1.1, CAPLENGTH 0x40
    assert (d.max_slots, d.max_intrs, d.nports, d.csz) == (16, 8, 8, 32)
    caps = d.extended_capabilities()
    assert [cid for _, cid in caps] == [2, 2]
    usb2, usb3 = (d.read(off) for off, _ in caps)
    assert usb2 >> 16 == 0x0200 and usb3 >> 16 == 0x0300
    assert d.read(caps[0][0] + 4) == 0x20425355               # "USB "
    assert d.read(caps[0][0] + 8) & 0xFFFF == 0x0401           # ports 1-4
    assert d.read(caps[1][0] + 8) & 0xFFFF == 0x0405           # ports 5-8
    assert d.op_read(0x08) == 1                                # 4K pages


def test_hcrst_and_run_stop(rig: Rig) -> None:
    d = rig.drv
    assert not d.op_read(0x04) & 1
    m1 = d.rt_read(0)
    time.sleep(0.01)
    assert d.rt_read(0) != m1                                  # MFINDEX runs
    d.op_write(0x00, 0)
    assert d.op_read(0x04) & 1                                 # HCHalted
    d.reset()
    assert d.op_read(0x38) == 0 and d.rt_read(0x20) == 0       # CONFIG, IMAN back to 0
    assert d.portsc(1) & PORTSC_CSC                            # devices connect again


# -- ports ----------------------------------------------------------------------------------------
def test_ports_connect_reset_and_w1c_bits(rig: Rig) -> None:
    d = rig.drv
    assert d.connected_ports() == [1, 2]
    sc = d.portsc(1)
    assert sc & (PORTSC_CCS | PORTSC_PP | PORTSC_CSC) == PORTSC_CCS | PORTSC_PP | PORTSC_CSC
    assert (sc >> 10) & 0xF == 3 and (sc >> 5) & 0xF == 7      # high speed, Polling
    assert not sc & PORTSC_PED
    usb3 = d.portsc(5)
    assert usb3 & PORTSC_PP and not usb3 & PORTSC_CCS and (usb3 >> 5) & 0xF == 5
    d.set_portsc(1, PORTSC_PP)                                 # writing 0s clears nothing
    assert d.portsc(1) & PORTSC_CSC
    d.set_portsc(1, PORTSC_PP | PORTSC_CSC)
    assert not d.portsc(1) & PORTSC_CSC
    sc = d.reset_port(1)
    assert sc & PORTSC_PED and sc & PORTSC_PRC and (sc >> 5) & 0xF == 0
    ev = d.wait_event(lambda e: e.type == PORT_STATUS_CHANGE, "port status change")
    assert ev.param >> 24 == 1
    assert not d.portsc(1) & PORTSC_PRC and d.portsc(1) & PORTSC_PED
    d.set_portsc(1, PORTSC_PP | PORTSC_PED)                    # PED: write 1 disables
    assert not d.portsc(1) & PORTSC_PED
    d.set_portsc(5, PORTSC_PP | 1 << 4)                        # reset of an empty port: no-op
    assert not d.portsc(5) & (PORTSC_PED | PORTSC_PRC)


# -- enumeration and control transfers ----------------------------------------------------------
def test_enumerate_tablet_descriptors(any_csz: Rig) -> None:
    d = any_csz.drv
    d.reset_port(1)
    sid = d.enable_slot()
    assert d.address_device(sid, 1, bsr=True).cc == CC_SUCCESS
    assert d.slot_state(sid) == SLOT_DEFAULT
    dev64 = d.control_in(sid, 0x80, 6, 0x0100, 0, 64)          # short: 18 bytes come back
    assert len(dev64) == 18
    assert d.address_device(sid, 1).cc == CC_SUCCESS
    assert d.slot_state(sid) == SLOT_ADDRESSED
    assert _u32(d.mem, d.out_ctx[sid] + 12) & 0xFF == sid      # the USB address
    desc = d.control_in(sid, 0x80, 6, 0x0100, 0, 18)
    bcd, cls, mps0, vid, pid = struct.unpack_from("<HBxxBHH", desc, 2)
    assert (bcd, cls, mps0, vid, pid) == (0x0200, 0, 64, 0x0627, 0x0001)
    head = d.control_in(sid, 0x80, 6, 0x0200, 0, 9)
    total = struct.unpack_from("<H", head, 2)[0]
    config = d.control_in(sid, 0x80, 6, 0x0200, 0, total)
    assert len(config) == total == 34
    assert config[9 + 5:9 + 8] == bytes([3, 0, 2])             # HID, no boot, "mouse"
    assert config[18 + 1] == 0x21 and config[27 + 2] == 0x81   # HID descriptor, EP 1 IN
    assert d.control_in(sid, 0x80, 6, 0x0300, 0, 255) == bytes([4, 3, 9, 4])
    product = d.control_in(sid, 0x80, 6, 0x0302, 0x409, 255)
    assert product[2:].decode("utf-16-le") == "USB Tablet"
    report = d.control_in(sid, 0x81, 6, 0x2200, 0, len(TABLET_REPORT_DESCRIPTOR))
    assert report == TABLET_REPORT_DESCRIPTOR
    assert d.configure_endpoint(sid, [(3, 7, 8)]).cc == CC_SUCCESS
    assert d.slot_state(sid) == SLOT_CONFIGURED
    assert d.ep_state(sid, 3) == EP_RUNNING
    ev, _ = d.control(sid, 0x00, 9, 1, 0, 0)                    # SET_CONFIGURATION 1
    assert ev.cc == CC_SUCCESS and any_csz.tablet.configuration == 1
    assert d.control_in(sid, 0x80, 8, 0, 0, 1) == b"\x01"
    assert d.control(sid, 0x21, 0x0A, 0, 0, 0)[0].cc == CC_SUCCESS      # SET_IDLE 0
    assert d.control(sid, 0x21, 0x0B, 1, 0, 0)[0].cc == CC_SUCCESS      # SET_PROTOCOL
    assert d.control_in(sid, 0xA1, 1, 0x0100, 0, 6) == bytes(6)         # GET_REPORT


def test_unsupported_request_stalls_and_the_endpoint_recovers(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(1)
    ev, _ = d.control(sid, 0x80, 6, 0x0F00, 0, 5)              # BOS: a USB 2.0 device STALLs
    assert ev.cc == CC_STALL
    assert d.ep_state(sid, 1) == EP_HALTED
    assert d.command(CMD_SET_TR_DEQ, 0, 0, sid << 24 | 1 << 16).cc == CC_CONTEXT_STATE
    assert d.command(CMD_RESET_EP, 0, 0, sid << 24 | 1 << 16).cc == CC_SUCCESS
    assert d.ep_state(sid, 1) == EP_STOPPED
    ring = d.rings[(sid, 1)]
    assert d.command(CMD_SET_TR_DEQ, ring.dequeue_pointer, 0,
                     sid << 24 | 1 << 16).cc == CC_SUCCESS
    assert d.control_in(sid, 0x80, 6, 0x0100, 0, 18)[:2] == b"\x12\x01"


# -- interrupt IN reports from the input hub ------------------------------------------------------
def test_tablet_reports_absolute_positions(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(1)
    trb, buf = d.queue_in(sid, 3, 8)
    d.poll_events()
    assert not [e for e in d.events if e.type == TRANSFER_EVENT]   # the TD waits: no input
    assert rig.dev.stats["budget_exhausted"] == 0
    rig.hub.abs(ABS_MAX, ABS_MAX // 2, 0, 1 | 4)               # left + middle
    ev, data = d.wait_in(sid, 3, trb, buf, 8)
    assert ev.cc == CC_SHORT_PACKET and ev.length == 2         # a 6-byte report in 8
    assert data == struct.pack("<BHHb", 5, 0x7FFF, 0x3FFF, 0)
    rig.hub.abs(10, 20, 1, 0)                                  # queued before the next TD
    rig.hub.abs(-5, 1 << 20, -200, 2)                          # clamped
    got = []
    for _ in range(2):
        trb, buf = d.queue_in(sid, 3, 8)
        got.append(d.wait_in(sid, 3, trb, buf, 8)[1])
    assert got == [struct.pack("<BHHb", 0, 10, 20, 1), struct.pack("<BHHb", 2, 0, 0x7FFF, -127)]


def test_moves_fold_while_the_guest_is_not_reading(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(1)
    for i in range(100):
        rig.hub.abs(i, i, 0, 1)
    trb, buf = d.queue_in(sid, 3, 8)
    assert d.wait_in(sid, 3, trb, buf, 8)[1] == struct.pack("<BHHb", 1, 99, 99, 0)


def test_keyboard_reports_and_leds(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(2)
    report = d.control_in(sid, 0x81, 6, 0x2200, 0, len(KEYBOARD_REPORT_DESCRIPTOR))
    assert report == KEYBOARD_REPORT_DESCRIPTOR
    assert rig.hub._pick(rig.hub._keyboards) is rig.keyboard   # configured: it takes keys
    for code, down in ((KEY_LEFTSHIFT, True), (KEY_A, True), (KEY_A, False),
                       (KEY_LEFTSHIFT, False)):
        rig.hub.key(code, down)
    got = []
    for _ in range(4):
        trb, buf = d.queue_in(sid, 3, 8)
        got.append(d.wait_in(sid, 3, trb, buf, 8)[1])
    assert got == [bytes([2, 0, 0, 0, 0, 0, 0, 0]), bytes([2, 0, 4, 0, 0, 0, 0, 0]),
                   bytes([2, 0, 0, 0, 0, 0, 0, 0]), bytes(8)]
    ev, _ = d.control(sid, 0x21, 0x09, 0x0200, 0, 1, b"\x02")  # SET_REPORT output: Caps Lock
    assert ev.cc == CC_SUCCESS and rig.keyboard.leds == HidKeyboard.LED_CAPS
    assert d.control_in(sid, 0xA1, 1, 0x0200, 0, 1) == b"\x02"
    for code in range(2, 9):                                   # 7 keys: rollover
        rig.hub.key(code, True)
    trb, buf = d.queue_in(sid, 3, 8)
    reports = [d.wait_in(sid, 3, trb, buf, 8)[1]]
    while reports[-1] != bytes([0, 0] + [1] * 6):
        trb, buf = d.queue_in(sid, 3, 8)
        reports.append(d.wait_in(sid, 3, trb, buf, 8)[1])


def test_keys_typed_faster_than_the_guest_reads_all_arrive(rig: Rig) -> None:
    """A VNC client typing a command at once: every press and release is reported, in
    order (the e2e boot lost all but the first few keys when the queue folded)."""
    d = rig.drv
    sid = d.enumerate(2)
    typed = [KEY_A + i % 10 for i in range(60)]
    for code in typed:
        rig.hub.key(code, True)
        rig.hub.key(code, False)
    pressed = []
    for _ in range(2 * len(typed)):
        trb, buf = d.queue_in(sid, 3, 8)
        report = d.wait_in(sid, 3, trb, buf, 8)[1]
        if report[2]:
            pressed.append(report[2])
    assert pressed == [EVDEV_TO_HID[c] for c in typed]


def test_unconfigured_keyboard_leaves_keys_to_the_ps2_keyboard() -> None:
    r = Rig()
    typed = []

    class Ps2:
        def input_key(self, code, down):
            typed.append(code)

    r.hub.attach(Ps2())
    r.hub.detach(r.keyboard)
    r.hub.attach(r.keyboard)                   # the USB keyboard is the newest sink
    r.hub.key(KEY_A, True)
    assert typed == [KEY_A]                    # not configured by the guest: PS/2 gets it
    r.drv.start()
    r.drv.enumerate(2)
    r.hub.key(KEY_LEFTSHIFT, True)
    assert typed == [KEY_A] and r.keyboard.queue
    assert r.vm.loop.faults == []
    r.close()


def test_idle_rate_repeats_the_current_report(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(1)
    rig.hub.abs(7, 8, 0, 0)
    trb, buf = d.queue_in(sid, 3, 8)
    d.wait_in(sid, 3, trb, buf, 8)
    assert d.control(sid, 0x21, 0x0A, 2 << 8, 0, 0)[0].cc == CC_SUCCESS     # 8 ms
    trb, buf = d.queue_in(sid, 3, 8)
    ev, data = d.wait_in(sid, 3, trb, buf, 8, timeout=2)
    assert data == struct.pack("<BHHb", 0, 7, 8, 0)


# -- commands and their completion codes --------------------------------------------------------
def test_command_errors(any_csz: Rig) -> None:
    d = any_csz.drv
    assert d.command(CMD_NOOP).cc == CC_SUCCESS
    assert d.command(CMD_DISABLE_SLOT, 0, 0, 3 << 24).cc == CC_SLOT_NOT_ENABLED
    assert d.command(CMD_DISABLE_SLOT, 0, 0, 99 << 24).cc == CC_TRB
    assert d.command(NORMAL).cc == CC_TRB                      # a transfer TRB type
    assert d.command(CMD_NEC_GET_FW).cc == CC_TRB               # not the NEC identity
    sid = d.enable_slot()
    assert d.address_device(sid, 3).cc == CC_TRANSACTION       # nothing on port 3
    assert d.address_device(sid, 1).cc == CC_TRANSACTION       # port 1 not reset/enabled
    d.reset_port(1)
    ictx = d.input_context(add=1)                              # A1 missing
    assert d.command(11, ictx, 0, sid << 24).cc == CC_PARAMETER
    assert d.address_device(sid, 9).cc == CC_PARAMETER         # no port 9
    assert d.configure_endpoint(sid, [(3, 7, 8)]).cc == CC_CONTEXT_STATE   # not addressed
    assert d.address_device(sid, 1).cc == CC_SUCCESS
    assert d.address_device(sid, 1).cc == CC_CONTEXT_STATE     # addressed already
    assert d.configure_endpoint(sid, [(3, 2, 8)]).cc == CC_PARAMETER        # OUT type, IN DCI
    assert d.configure_endpoint(sid, [(3, 7, 0)]).cc == CC_PARAMETER        # no max packet
    assert d.command(CMD_STOP_EP, 0, 0, sid << 24 | 5 << 16).cc == CC_EP_NOT_ENABLED
    assert d.command(CMD_RESET_EP, 0, 0, sid << 24 | 1 << 16).cc == CC_CONTEXT_STATE
    ictx = d.input_context(add=2)
    d.mem.write(ictx + 2 * d.csz + 4, struct.pack("<I", 4 << 3 | 8 << 16))
    assert d.command(CMD_EVALUATE_CTX, ictx, 0, sid << 24).cc == CC_SUCCESS
    assert _u32(d.mem, d.out_ctx[sid] + d.csz + 4) >> 16 == 8  # EP0 max packet now 8
    assert d.command(CMD_RESET_DEVICE, 0, 0, sid << 24).cc == CC_SUCCESS
    assert d.slot_state(sid) == SLOT_DEFAULT
    assert d.command(CMD_RESET_DEVICE, 0, 0, sid << 24).cc == CC_CONTEXT_STATE
    assert d.command(CMD_DISABLE_SLOT, 0, 0, sid << 24).cc == CC_SUCCESS
    assert d.command(CMD_STOP_EP, 0, 0, sid << 24 | 1 << 16).cc == CC_SLOT_NOT_ENABLED
    slots = [d.enable_slot() for _ in range(d.max_slots)]
    assert sorted(slots) == list(range(1, 17))
    assert d.command(9).cc == CC_NO_SLOTS


def test_nec_firmware_command() -> None:
    r = Rig(pci_ids="nec")
    r.drv.start()
    addr = r.drv.cmd_ring.put(0, 0, CMD_NEC_GET_FW << 10)
    r.drv.ring_doorbell(0, 0)
    ev = r.drv.wait_event(lambda e: e.param == addr, "NEC completion")
    assert ev.type == 48 and ev.cc == CC_SUCCESS and ev.length == 0x3025
    r.close()


def test_stop_endpoint_with_a_waiting_td_and_set_dequeue(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(1)
    trb, buf = d.queue_in(sid, 3, 8)
    d.poll_events()
    ev = d.command(CMD_STOP_EP, 0, 0, sid << 24 | 3 << 16)
    assert ev.cc == CC_SUCCESS and d.ep_state(sid, 3) == EP_STOPPED
    stopped = d.wait_event(lambda e: e.type == TRANSFER_EVENT, "stopped TD")
    assert stopped.cc == CC_STOPPED_LENGTH_INVALID and stopped.param == trb
    deq = _u32(d.mem, d.out_ctx[sid] + 3 * d.csz + 8)
    assert deq & ~0xF == trb                                   # the hardware dequeue: the TD
    assert d.command(CMD_STOP_EP, 0, 0, sid << 24 | 3 << 16).cc == CC_CONTEXT_STATE
    ring = d.rings[(sid, 3)]
    assert d.command(CMD_SET_TR_DEQ, ring.dequeue_pointer, 0,
                     sid << 24 | 3 << 16).cc == CC_SUCCESS     # past the cancelled TD
    rig.hub.abs(1, 2, 0, 0)
    trb, buf = d.queue_in(sid, 3, 8)                           # the doorbell restarts it
    assert d.wait_in(sid, 3, trb, buf, 8)[1] == struct.pack("<BHHb", 0, 1, 2, 0)
    assert d.ep_state(sid, 3) == EP_RUNNING


def test_command_ring_stop(rig: Rig) -> None:
    d = rig.drv
    d.command(CMD_NOOP)
    assert d.op_read(0x18) & 1 << 3                            # CRR
    d.op_write(0x18, 1 << 1)                                   # CS
    ev = d.wait_event(lambda e: e.type == COMMAND_COMPLETION, "ring stopped")
    assert ev.cc == CC_CMD_RING_STOPPED and not d.op_read(0x18) & 1 << 3


# -- event rings and interrupts -------------------------------------------------------------------
def test_event_ring_segments_wrap_and_full_ring_waits() -> None:
    r = Rig()
    d = r.drv
    d.start(event_segments=(16, 16), cmd_trbs=64)
    for _ in range(100):                                      # wraps both segments 3 times
        assert d.command(CMD_NOOP).cc == CC_SUCCESS
    # Without the driver reading, the 32-TRB ring holds 31 events; the rest waits.
    addrs = [d.cmd_ring.put(0, 0, CMD_NOOP << 10) for _ in range(40)]
    d.ring_doorbell(0, 0)
    d.vm.sync()
    assert len(r.dev.intrs[0].queue) == 40 - 31
    got = []
    while len(got) < 40:
        got += [e.param for e in d.poll_events()]
    assert got == addrs
    assert r.vm.loop.faults == []
    r.close()


def test_msix_interrupts_and_moderation() -> None:
    r = Rig()
    pci = PciDriver(r.vm)
    pci.enable_msix(SLOT, 0)
    gsi = r.dev.irq.msix.routes.gsis[0]
    d = r.drv
    d.start(imod=0xFFFF)                                       # 16.4 ms between interrupts
    r.vm.msi_count(gsi)
    t0 = time.monotonic()
    d.command(CMD_NOOP)
    assert r.vm.msi_count(gsi) == 1
    assert d.op_read(0x04) & 1 << 3                            # EINT
    d.cmd_ring.put(0, 0, CMD_NOOP << 10)       # the driver does not poll: it waits for IRQs
    d.ring_doorbell(0, 0)
    deadline = time.monotonic() + 2
    while not r.vm.msi_count(gsi) and time.monotonic() < deadline:
        time.sleep(0.0002)
    assert 0.016 <= time.monotonic() - t0 < 2                   # held back by IMOD
    assert r.dev.stats["interrupts"] == 2
    r.close()


def test_intx_level_follows_iman_ip() -> None:
    r = Rig()
    d = r.drv
    d.start()
    d.command(CMD_NOOP)
    assert r.dev.intx.level
    d.rt_write(0x20, 1 << 1 | 1)                               # IMAN: clear IP, keep IE
    assert not r.dev.intx.level
    r.close()


# -- host system errors, scratchpads ------------------------------------------------------------
def test_unreachable_rings_halt_with_hse_and_hcrst_recovers(rig: Rig) -> None:
    d = rig.drv
    d.op_write(0x00, 0)
    d.op_write64(0x18, 0x7FFF_0000_0000 | 1)                   # command ring outside RAM
    d.run()
    d.ring_doorbell(0, 0)
    d.wait(lambda: d.op_read(0x04) & USBSTS_HSE, "HSE")
    assert d.op_read(0x04) & 1                                 # halted
    d.start()
    d.enumerate(1)
    assert rig.dev.stats["hse"] == 1


def test_scratchpads() -> None:
    r = Rig(scratchpads=3)
    assert r.drv.scratchpads == 3
    r.drv.start()
    r.drv.enumerate(1)
    r.drv.reset()
    r.drv.setup(scratchpad_pointers=[0x10000, 0x10001, 0x20000])   # not page-aligned
    r.drv.op_write(0x00, 1)
    r.drv.wait(lambda: r.drv.op_read(0x04) & USBSTS_HSE, "HSE")
    r.close()


def test_link_loop_is_bounded(rig: Rig) -> None:
    d = rig.drv
    base = d.cmd_ring.base + 16 * d.cmd_ring.enq
    d.mem.write(base, struct.pack("<QII", base, 0, 6 << 10 | 1))   # a Link to itself
    d.ring_doorbell(0, 0)
    d.vm.sync()
    assert rig.dev.stats["link_loops"] == 1
    ring = d.rings.get((1, 1))
    assert ring is None
    sid = d.enumerate(1)                       # a transfer ring of TRBs chained forever
    ring = d.rings[(sid, 3)]
    start = ring.base + 16 * ring.enq
    for i in range(31):
        d.mem.write(ring.base + 16 * i, struct.pack("<QII", 0x1000, 8, NORMAL << 10 | 1 << 4 |
                                                    ring.cycle))
    d.mem.write(ring.base + 16 * 31, struct.pack("<QII", ring.base, 0, 6 << 10 | ring.cycle))
    del start
    before = rig.dev.stats["budget_exhausted"]
    d.ring_doorbell(sid, 3)
    d.vm.sync()
    assert rig.dev.stats["budget_exhausted"] == before + 1
    assert TRB_BUDGET >= 4096


# -- the plugin ---------------------------------------------------------------------------------
def test_plugin_options_and_factory(tmp_path) -> None:
    registered = []
    plugin.vmrun_register_devices(registered.append)
    (dtype,) = registered
    opts = validate_options(dtype, {"devices": ["keyboard", "tablet"], "context_size": "64"},
                            tmp_path)
    from vmrun.core.host import HostContext

    host = HostContext()
    dev = dtype.factory(DeviceContext("usb", "m", "u", host), opts)
    assert [d.name for d in dev.usb_devices] == ["keyboard", "tablet"] and dev.csz == 64
    assert validate_options(dtype, {}, tmp_path)["devices"] == ["tablet"]
    for bad in ({"devices": ["mouse"]}, {"devices": "tablet"},
                {"devices": ["tablet", "tablet"]}):
        with pytest.raises(ValueError):
            validate_options(dtype, bad, tmp_path)
    host.close()


# -- more transfer shapes, suspend, bus mastering ----------------------------------------------
def test_chained_trbs_with_event_data(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(1)
    ring = d.rings[(sid, 3)]
    a, b = d.alloc(4, 16), d.alloc(4, 16)
    first = ring.put(a, 4, NORMAL << 10 | 1 << 4)                     # CH
    second = ring.put(b, 4, NORMAL << 10 | 1 << 4 | 1 << 2)           # CH, ISP
    ed = ring.put(0xED0000DA7A, 0, 7 << 10 | 1 << 5)                  # Event Data, IOC
    d.ring_doorbell(sid, 3)
    rig.hub.abs(0x1122, 0x3344, 0, 1)
    short = d.wait_event(lambda e: e.type == TRANSFER_EVENT and e.param == second, "short")
    assert short.cc == CC_SHORT_PACKET and short.length == 2          # 2 of its 4 bytes
    data = d.wait_event(lambda e: e.type == TRANSFER_EVENT and e.param == 0xED0000DA7A, "ED")
    assert data.control & 1 << 2 and data.length == 6                 # ED, EDTLA
    assert d.mem.read(a, 4) + d.mem.read(b, 2) == struct.pack("<BHHb", 1, 0x1122, 0x3344, 0)
    assert not [e for e in d.events if e.param == first]
    del ed


def test_out_endpoint_the_device_lacks_is_a_transaction_error(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(1)
    assert d.configure_endpoint(sid, [(2, 3, 8)]).cc == CC_SUCCESS   # interrupt OUT, EP 1
    trb = d.rings[(sid, 2)].put(0x1122334455667788, 8, NORMAL << 10 | 1 << 6 | 1 << 5)
    d.ring_doorbell(sid, 2)
    ev = d.wait_event(lambda e: e.type == TRANSFER_EVENT and e.param == trb, "OUT TD")
    assert ev.cc == CC_TRANSACTION and d.ep_state(sid, 2) == EP_HALTED
    bad = d.rings[(sid, 3)].put(0x1000, 8, 2 << 10)                  # a Setup TRB on EP 1 IN
    d.ring_doorbell(sid, 3)
    ev = d.wait_event(lambda e: e.type == TRANSFER_EVENT and e.param == bad, "TRB error")
    assert ev.cc == CC_TRB and d.ep_state(sid, 3) == EP_HALTED


def test_suspend_and_remote_wakeup(rig: Rig) -> None:
    d = rig.drv
    sid = d.enumerate(1)
    assert d.control(sid, 0x00, 3, 1, 0, 0)[0].cc == CC_SUCCESS       # SET_FEATURE wakeup
    trb, buf = d.queue_in(sid, 3, 8)
    neutral = d.portsc(1) & 0x0E00C200
    d.set_portsc(1, neutral | 1 << 16 | 3 << 5)                        # LWS, PLS = U3
    assert (d.portsc(1) >> 5) & 0xF == 3
    d.poll_events()
    d.events.clear()
    rig.hub.abs(5, 6, 0, 0)
    ev = d.wait_event(lambda e: e.type == PORT_STATUS_CHANGE, "remote wake-up")
    assert ev.param >> 24 == 1 and (d.portsc(1) >> 5) & 0xF == 15      # Resume
    assert not [e for e in d.events if e.type == TRANSFER_EVENT]       # still suspended
    d.set_portsc(1, neutral | 1 << 22 | 1 << 16)                       # clear PLC, U0
    assert (d.portsc(1) >> 5) & 0xF == 0
    assert d.wait_in(sid, 3, trb, buf, 8)[1] == struct.pack("<BHHb", 0, 5, 6, 0)


def test_bus_mastering_off_is_a_host_system_error(rig: Rig) -> None:
    pci = PciDriver(rig.vm)
    cmd = pci.read(SLOT, 0, 4, 2)
    pci.write(SLOT, 0, 4, 2, cmd & ~4)
    rig.drv.cmd_ring.put(0, 0, CMD_NOOP << 10)
    rig.drv.ring_doorbell(0, 0)
    rig.drv.wait(lambda: rig.drv.op_read(0x04) & USBSTS_HSE, "HSE")
    pci.write(SLOT, 0, 4, 2, cmd)
    rig.drv.start()
    assert rig.drv.command(CMD_NOOP).cc == CC_SUCCESS


def test_msi_when_the_driver_enables_no_msix() -> None:
    r = Rig()
    pci = PciDriver(r.vm)
    cap = dict((cid, off) for off, cid in pci.capabilities(SLOT, 0))[0x05]
    pci.write(SLOT, 0, cap + 4, 4, 0xFEE00000)
    pci.write(SLOT, 0, cap + 8, 4, 0)
    pci.write(SLOT, 0, cap + 12, 2, 0x41)
    pci.write(SLOT, 0, cap + 2, 2, pci.read(SLOT, 0, cap + 2, 2) | 1)
    assert r.dev.irq.mode == "msi"
    gsi = r.dev.irq.msi.gsis[0]
    r.drv.start()
    r.vm.msi_count(gsi)
    r.drv.command(CMD_NOOP)
    assert r.vm.msi_count(gsi) == 1 and not r.dev.intx.level
    r.close()


# -- snapshots ----------------------------------------------------------------------------------
def _moved(rig: Rig) -> Rig:
    """A fresh controller with fresh devices on a copy of ``rig``'s RAM, with the state
    ``rig`` saved (through JSON); ``rig``'s driver goes on with it, unaware of the move."""
    import json

    state = json.loads(json.dumps(rig.vm.pci.save_state()))
    new = Rig()
    new.vm.memory.write(0, rig.vm.memory.read(0, rig.vm.memory.size))
    new.vm.pci.load_state(state)
    new.vm.sync()
    d = rig.drv
    d.vm, d.mem, d.pci = new.vm, new.vm.memory, PciDriver(new.vm)
    for ring in [d.cmd_ring, *d.rings.values()]:
        ring.mem = new.vm.memory
    new.drv = d
    return new


def test_snapshot_moves_slots_rings_and_hid_state_to_a_fresh_controller(rig: Rig) -> None:
    """Both HID devices enumerated, a tablet IN TD waiting (the controller holds it), a
    keyboard report queued, Caps Lock set, the tablet's idle rate and boot protocol set,
    the event ring part-consumed. The fresh controller goes on: the waiting TD completes
    with the next move, the queued key report arrives on the same endpoint ring, commands
    complete on the same command ring and event ring, and the HID state reads back."""
    d = rig.drv
    tab = d.enumerate(1)
    kbd = d.enumerate(2)
    ev, _ = d.control(kbd, 0x21, 0x09, 0x0200, 0, 1, b"\x02")      # Caps Lock LED
    assert ev.cc == CC_SUCCESS
    assert d.control(tab, 0x21, 0x0B, 0, 0, 0)[0].cc == CC_SUCCESS   # SET_PROTOCOL boot
    rig.hub.key(KEY_A, True)                                       # queued: no TD yet
    trb, buf = d.queue_in(tab, 3, 8)                               # waits: no input
    assert d.control(tab, 0x21, 0x0A, 50 << 8, 0, 0)[0].cc == CC_SUCCESS   # idle 200 ms
    d.poll_events()
    assert not [e for e in d.events if e.type == TRANSFER_EVENT and e.param == trb]
    portsc = d.portsc(1)
    new = _moved(rig)
    rig.close()
    try:
        assert new.keyboard.leds == HidKeyboard.LED_CAPS and new.keyboard.queue
        assert new.tablet.protocol == 0 and new.tablet.idle == 50
        assert d.portsc(1) == portsc and d.slot_state(kbd) == SLOT_CONFIGURED
        assert d.control_in(kbd, 0xA1, 1, 0x0200, 0, 1) == b"\x02"   # GET_REPORT: LEDs
        new.hub.abs(100, 200, 0, 1)
        ev, data = d.wait_in(tab, 3, trb, buf, 8)
        assert data == struct.pack("<BHHb", 1, 100, 200, 0)
        t2, b2 = d.queue_in(kbd, 3, 8)
        assert d.wait_in(kbd, 3, t2, b2, 8)[1] == bytes([0, 0, 4, 0, 0, 0, 0, 0])
        assert d.command(CMD_NOOP).cc == CC_SUCCESS
        assert new.vm.loop.faults == []
    finally:
        new.close()


def test_snapshot_keeps_events_not_yet_written_and_the_ring_cycle() -> None:
    """A full event ring holds events back in the controller; they are saved and written
    once the driver, after the move, makes room — with the right cycle bit."""
    r = Rig()
    r.drv.start(event_segments=(16,))
    d = r.drv
    for _ in range(20):                      # 15 fit (one slot stays free), 5 wait
        d.cmd_ring.put(0, 0, CMD_NOOP << 10)
    d.ring_doorbell(0, 0)
    r.vm.sync()
    assert len(r.dev.intrs[0].queue) == 5
    new = _moved(r)
    r.close()
    try:
        got = []
        for _ in range(100):
            got += [e for e in d.poll_events() if e.type == COMMAND_COMPLETION]
            if len(got) >= 20:
                break
        assert len(got) == 20 and all(e.cc == CC_SUCCESS for e in got)
    finally:
        new.close()


def test_a_controller_state_of_another_version_is_refused(rig: Rig) -> None:
    state = rig.dev.device_state()
    state["version"] = 3
    with pytest.raises(ValueError, match="xhci: state version 3, this vmrun has 1"):
        rig.dev.load_device_state(state)
