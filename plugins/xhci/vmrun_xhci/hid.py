"""USB HID devices fed by the input hub: a tablet (absolute pointer) and a boot keyboard.

The tablet's report descriptor is QEMU's ``usb-tablet`` one (buttons 1-3, X and Y 0..0x7fff,
a wheel), so guests that know that device (every Linux, Windows' inbox HID driver) map the
VNC pointer 1:1. The keyboard is a boot-protocol keyboard (modifiers, a reserved byte, six key
usages) with the five LED output bits. Both are high-speed devices with one interrupt IN
endpoint (0x81), like QEMU's defaults.

Reports are made when the hub delivers an event (any thread) and queued (16 at most; when
full the newest is folded into the last, so the final state is always right); the controller
asks for one when the guest has an interrupt IN TD posted, and a device with nothing queued
answers NAK and calls ``notify`` when a report arrives — nothing polls.
"""

from __future__ import annotations

import struct
import time
from collections import deque

from vmrun_xhci.spec import EPT_INTR_IN
from vmrun_xhci.usb import NAK, NO_ENDPOINT, STALL, UsbDevice

DT_HID, DT_REPORT = 0x21, 0x22
HID_GET_REPORT, HID_GET_IDLE, HID_GET_PROTOCOL = 1, 2, 3
HID_SET_REPORT, HID_SET_IDLE, HID_SET_PROTOCOL = 9, 10, 11
REPORT_INPUT, REPORT_OUTPUT = 1, 2
VENDOR, PRODUCT = 0x0627, 0x0001           # QEMU's HID devices' IDs, which guests know
QUEUE = 16                  # pointer reports held for a guest that is not reading
#: Keyboard reports held: each press and release must reach the guest (a VNC client types a
#: command faster than an emulated guest kernel polls; folding would lose keystrokes).
KEY_QUEUE = 1024

# QEMU's usb-tablet report descriptor (74 bytes).
TABLET_REPORT_DESCRIPTOR = bytes([
    0x05, 0x01, 0x09, 0x01, 0xA1, 0x01,            # Generic Desktop, Pointer, Application
    0x09, 0x01, 0xA1, 0x00,                        # Pointer, Physical
    0x05, 0x09, 0x19, 0x01, 0x29, 0x03,            # Buttons 1..3
    0x15, 0x00, 0x25, 0x01, 0x95, 0x03, 0x75, 0x01, 0x81, 0x02,
    0x95, 0x01, 0x75, 0x05, 0x81, 0x01,            # 5 bits padding
    0x05, 0x01, 0x09, 0x30, 0x09, 0x31,            # X, Y
    0x15, 0x00, 0x26, 0xFF, 0x7F, 0x35, 0x00, 0x46, 0xFF, 0x7F,
    0x75, 0x10, 0x95, 0x02, 0x81, 0x02,            # 2 x 16 bits, absolute
    0x05, 0x01, 0x09, 0x38,                        # Wheel
    0x15, 0x81, 0x25, 0x7F, 0x35, 0x00, 0x45, 0x00,
    0x75, 0x08, 0x95, 0x01, 0x81, 0x06,            # 8 bits, relative
    0xC0, 0xC0,
])

# A boot keyboard (63 bytes): modifiers, reserved, LEDs out, six key usages.
KEYBOARD_REPORT_DESCRIPTOR = bytes([
    0x05, 0x01, 0x09, 0x06, 0xA1, 0x01,            # Generic Desktop, Keyboard, Application
    0x75, 0x01, 0x95, 0x08, 0x05, 0x07, 0x19, 0xE0, 0x29, 0xE7,
    0x15, 0x00, 0x25, 0x01, 0x81, 0x02,            # 8 modifier bits
    0x95, 0x01, 0x75, 0x08, 0x81, 0x01,            # reserved byte
    0x95, 0x05, 0x75, 0x01, 0x05, 0x08, 0x19, 0x01, 0x29, 0x05,
    0x91, 0x02,                                    # 5 LED bits out
    0x95, 0x01, 0x75, 0x03, 0x91, 0x01,            # 3 bits padding out
    0x95, 0x06, 0x75, 0x08, 0x15, 0x00, 0x25, 0xFF,
    0x05, 0x07, 0x19, 0x00, 0x29, 0xFF, 0x81, 0x00,  # 6 key usages (array)
    0xC0,
])


def _keymap() -> dict[int, int]:
    """evdev key code -> HID keyboard usage (page 7)."""
    m: dict[int, int] = {}
    letters = (30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20,
               22, 47, 17, 45, 21, 44)                       # KEY_A..KEY_Z
    for i, code in enumerate(letters):
        m[code] = 0x04 + i
    for i in range(9):
        m[2 + i] = 0x1E + i                                  # KEY_1..KEY_9
    m[11] = 0x27                                             # KEY_0
    for usage, code in ((0x28, 28), (0x29, 1), (0x2A, 14), (0x2B, 15), (0x2C, 57), (0x2D, 12),
                        (0x2E, 13), (0x2F, 26), (0x30, 27), (0x31, 43), (0x33, 39), (0x34, 40),
                        (0x35, 41), (0x36, 51), (0x37, 52), (0x38, 53), (0x39, 58)):
        m[code] = usage
    for i in range(10):
        m[59 + i] = 0x3A + i                                 # F1..F10
    m[87], m[88] = 0x44, 0x45                                # F11, F12
    for usage, code in ((0x46, 99), (0x47, 70), (0x48, 119), (0x49, 110), (0x4A, 102),
                        (0x4B, 104), (0x4C, 111), (0x4D, 107), (0x4E, 109), (0x4F, 106),
                        (0x50, 105), (0x51, 108), (0x52, 103), (0x53, 69), (0x54, 98),
                        (0x55, 55), (0x56, 74), (0x57, 78), (0x58, 96), (0x59, 79), (0x5A, 80),
                        (0x5B, 81), (0x5C, 75), (0x5D, 76), (0x5E, 77), (0x5F, 71), (0x60, 72),
                        (0x61, 73), (0x62, 82), (0x63, 83), (0x64, 86), (0x65, 127),
                        (0x66, 116), (0x67, 117), (0x7F, 113), (0x80, 115), (0x81, 114),
                        (0x85, 121), (0x87, 89), (0x88, 93), (0x89, 124), (0x8A, 92),
                        (0x8B, 94), (0x8C, 95), (0x90, 122), (0x91, 123)):
        m[code] = usage
    for i in range(12):
        m[183 + i] = 0x68 + i                                # F13..F24
    for i, code in enumerate((29, 42, 56, 125, 97, 54, 100, 126)):
        m[code] = 0xE0 + i                                   # modifiers
    return m


EVDEV_TO_HID = _keymap()


def _config(subclass: int, protocol: int, report_len: int, packet: int,
            interval: int) -> bytes:
    interface = bytes([9, 4, 0, 0, 1, 3, subclass, protocol, 0])
    hid = struct.pack("<BBHBBBH", 9, DT_HID, 0x0111, 0, 1, DT_REPORT, report_len)
    endpoint = struct.pack("<BBBBHB", 7, 5, 0x81, 3, packet, interval)
    total = 9 + len(interface) + len(hid) + len(endpoint)
    config = struct.pack("<BBHBBBBB", 9, 2, total, 1, 1, 4, 0xA0, 50)
    return config + interface + hid + endpoint


def _device(product: int) -> bytes:
    return struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0, 0, 0, 64, VENDOR, product,
                       0x0000, 1, 2, 3, 1)


class HidDevice(UsbDevice):
    """What the tablet and the keyboard share: the HID class requests, the report queue."""

    report_descriptor = b""
    endpoints = {0x81: (EPT_INTR_IN, 8)}
    #: host-side: when the last report went (monotonic; the idle timer starts over after a
    #: restore), how many did, the timer and loop (None until attached)
    state_exclude = ("last_sent", "reports_sent", "timer", "loop")

    def __init__(self) -> None:
        super().__init__()
        self.queue: deque[bytes] = deque()
        self.idle = 0            # 4 ms units; 0: report only on change
        self.protocol = 1        # report protocol
        self.last_sent = 0.0
        self.reports_sent = 0
        self.timer = None
        self.loop = None

    def attach(self, notify, loop=None) -> None:
        super().attach(notify, loop)
        self.loop = loop

    def current_report(self) -> bytes:
        raise NotImplementedError

    def load_state(self, fields: dict) -> None:
        super().load_state(fields)
        self.last_sent = time.monotonic()        # the idle period starts over

    def reset_state(self) -> None:
        with self.lock:
            self.queue.clear()
            self.idle = 0
            self.protocol = 1

    queue_limit = QUEUE

    def push(self, report: bytes, fold: bool = False) -> None:
        """Queue a report (any thread) and tell the controller; ``fold``: it may replace the
        last queued one (a move that only changes the position)."""
        with self.lock:
            if not self.configuration:
                return
            q = self.queue
            if q and (fold or len(q) >= self.queue_limit):
                q[-1] = report
            else:
                q.append(report)
        self.notify()

    def data_in(self, ep: int, maxlen: int) -> bytes | str:
        if ep != 0x81 or not self.configuration:
            return NO_ENDPOINT
        if ep in self.halted:
            return STALL  # type: ignore[return-value]
        with self.lock:
            report = self.queue.popleft() if self.queue else None
            now = time.monotonic()
            if report is None and self.idle:
                wait = self.last_sent + self.idle * 0.004 - now
                if wait <= 0:
                    report = self.current_report()
                else:
                    self._arm_idle(wait)
            if report is None:
                return NAK
            self.last_sent = now
            self.reports_sent += 1
            return report

    def _arm_idle(self, delay: float) -> None:
        """With a non-zero idle rate the current report is repeated when nothing changed for
        that long: one timer, armed only while a TD waits."""
        if self.loop is None:
            return
        if self.timer is None:
            self.timer = self.loop.timer(self.notify)
        self.timer.arm(delay)

    def class_descriptor(self, dtype: int, index: int) -> bytes | None:
        if dtype == DT_REPORT:
            return self.report_descriptor
        if dtype == DT_HID:
            c = self.config_descriptor
            return c[18:27]
        return STALL

    def class_request(self, rtype: int, req: int, value: int, index: int, length: int,
                      data: bytes | None) -> bytes | None:
        if rtype & 0x1F != 1 or index & 0xFF != 0:
            return STALL
        if rtype == 0xA1 and req == HID_GET_REPORT:
            if value >> 8 == REPORT_INPUT:
                return self.current_report()
            return self.get_output_report(value)
        if rtype == 0xA1 and req == HID_GET_IDLE:
            return bytes([self.idle])
        if rtype == 0xA1 and req == HID_GET_PROTOCOL:
            return bytes([self.protocol])
        if rtype == 0x21 and req == HID_SET_IDLE:
            self.idle = value >> 8
            return b""
        if rtype == 0x21 and req == HID_SET_PROTOCOL:
            self.protocol = value & 1
            return b""
        if rtype == 0x21 and req == HID_SET_REPORT:
            return self.set_output_report(value, data or b"")
        return STALL

    def get_output_report(self, value: int) -> bytes | None:
        return STALL

    def set_output_report(self, value: int, data: bytes) -> bytes | None:
        return STALL

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()
            self.timer = None


class HidTablet(HidDevice):
    """QEMU's usb-tablet, as an input hub tablet sink (``input_abs``)."""

    name = "tablet"
    report_descriptor = TABLET_REPORT_DESCRIPTOR
    device_descriptor = _device(PRODUCT)
    config_descriptor = _config(0, 2, len(TABLET_REPORT_DESCRIPTOR), 8, 4)
    strings = ("vmrun", "USB Tablet", "1", "HID Tablet")

    def __init__(self) -> None:
        super().__init__()
        self.x = self.y = self.buttons = 0

    def current_report(self) -> bytes:
        return struct.pack("<BHHb", self.buttons, self.x, self.y, 0)

    def input_abs(self, x: int, y: int, wheel: int, buttons: int) -> None:
        wheel = max(-127, min(127, wheel))
        with self.lock:
            fold = not wheel and buttons == self.buttons and bool(self.queue) and \
                self.queue[-1][5] == 0
            self.x, self.y, self.buttons = x, y, buttons & 7
            self.push(struct.pack("<BHHb", self.buttons, x, y, wheel), fold)


class HidKeyboard(HidDevice):
    """A boot keyboard, as an input hub keyboard sink (``input_key``), with LEDs."""

    name = "keyboard"
    report_descriptor = KEYBOARD_REPORT_DESCRIPTOR
    device_descriptor = _device(PRODUCT)
    config_descriptor = _config(1, 1, len(KEYBOARD_REPORT_DESCRIPTOR), 8, 4)
    strings = ("vmrun", "USB Keyboard", "1", "HID Keyboard")
    queue_limit = KEY_QUEUE
    LED_NUM, LED_CAPS, LED_SCROLL = 1, 2, 4

    def __init__(self) -> None:
        super().__init__()
        self.modifiers = 0
        self.keys: list[int] = []
        self.leds = 0

    def current_report(self) -> bytes:
        keys = self.keys if len(self.keys) <= 6 else [0x01] * 6      # ErrorRollOver
        return bytes([self.modifiers, 0, *keys, *([0] * (6 - len(keys)))])

    def input_key(self, code: int, down: bool) -> None:
        usage = EVDEV_TO_HID.get(code)
        if usage is None:
            return
        with self.lock:
            if usage >= 0xE0:
                bit = 1 << (usage - 0xE0)
                self.modifiers = self.modifiers | bit if down else self.modifiers & ~bit
            elif down and usage not in self.keys:
                self.keys.append(usage)
            elif not down and usage in self.keys:
                self.keys.remove(usage)
            else:
                return
            self.push(self.current_report())

    def reset_state(self) -> None:
        super().reset_state()
        self.leds = 0

    def get_output_report(self, value: int) -> bytes | None:
        return bytes([self.leds]) if value >> 8 == REPORT_OUTPUT else STALL

    def set_output_report(self, value: int, data: bytes) -> bytes | None:
        if value >> 8 != REPORT_OUTPUT or not data:
            return STALL
        self.leds = data[0] & 0x1F
        return b""


DEVICES = {"tablet": HidTablet, "keyboard": HidKeyboard}
