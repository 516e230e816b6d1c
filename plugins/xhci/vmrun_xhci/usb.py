"""A USB device as the host controller sees it: control requests on endpoint 0 and data on
the other endpoints, nothing about TRBs or rings.

The controller calls, on the event loop:

- :meth:`UsbDevice.control` with the 8-byte setup packet and (OUT) the data stage: the IN
  data to return, or :data:`STALL`;
- :meth:`UsbDevice.data_in` / :meth:`UsbDevice.data_out` for an endpoint: bytes, or
  :data:`NAK` when the device has nothing now (the controller keeps the TD pending and waits
  for :meth:`UsbDevice.wakeup`, never polls), or :data:`STALL`, or :data:`NO_ENDPOINT`
  (nothing answers: a transaction error);
- :meth:`UsbDevice.bus_reset` when its port is reset.

The device calls the ``notify`` callback it was attached with (from any thread) when an IN
endpoint has data. Standard requests (descriptors, address, configuration, features) are
answered here; a class adds :meth:`UsbDevice.class_request`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

STALL = None            # control(): a STALL handshake
NAK = "nak"             # data_in()/data_out(): nothing now, try again when woken
NO_ENDPOINT = "none"    # data_in()/data_out(): no such endpoint (no handshake at all)

DT_DEVICE, DT_CONFIG, DT_STRING, DT_INTERFACE, DT_ENDPOINT = 1, 2, 3, 4, 5
DT_DEVICE_QUALIFIER, DT_OTHER_SPEED = 6, 7
REQ_GET_STATUS, REQ_CLEAR_FEATURE, REQ_SET_FEATURE, REQ_SET_ADDRESS = 0, 1, 3, 5
REQ_GET_DESCRIPTOR, REQ_SET_DESCRIPTOR, REQ_GET_CONFIGURATION, REQ_SET_CONFIGURATION = 6, 7, 8, 9
REQ_GET_INTERFACE, REQ_SET_INTERFACE = 10, 11
FEATURE_ENDPOINT_HALT, FEATURE_REMOTE_WAKEUP = 0, 1
SETUP = struct.Struct("<BBHHH")


def string_descriptor(text: str) -> bytes:
    data = text.encode("utf-16-le")
    return bytes([2 + len(data), DT_STRING]) + data


class UsbDevice:
    """A high-speed USB 2.0 device with one configuration (subclasses give descriptors)."""

    name = "usb-device"
    speed = 3                      # PORTSC speed ID: high speed
    device_descriptor = b""        # 18 bytes
    config_descriptor = b""        # the whole configuration (interfaces, endpoints, class)
    strings: tuple[str, ...] = ()  # string descriptors 1..n
    #: endpoint address -> (xHCI endpoint type, max packet size), endpoint 0 excluded
    endpoints: dict[int, tuple[int, int]] = {}

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.notify: Callable[[], None] = lambda: None
        self.address = 0
        self.configuration = 0
        self.remote_wakeup = False
        self.halted: set[int] = set()

    # -- what the controller calls ---------------------------------------------------------
    def attach(self, notify: Callable[[], None], loop=None) -> None:
        """``notify()``: an IN endpoint has data; ``loop``: the event loop, for timers."""
        self.notify = notify

    #: Plain attributes that are not guest state: host-side bookkeeping (see save_state).
    state_exclude: tuple[str, ...] = ()

    def save_state(self) -> dict:
        """The device's state as the guest left it (address, configuration, remote
        wake-up, halted endpoints, and a subclass's own plain attributes: HID idle rate,
        protocol, LEDs, reports not yet fetched), plain data."""
        from vmrun.api import plain_fields

        with self.lock:
            fields = plain_fields(self, self.state_exclude)
            fields["halted"] = sorted(self.halted)
            return fields

    def load_state(self, fields: dict) -> None:
        from vmrun.api import load_fields

        with self.lock:
            fields = dict(fields)
            self.halted = set(fields.pop("halted"))
            load_fields(self, fields)

    def bus_reset(self) -> None:
        """A port reset: back to the Default state (address 0, not configured)."""
        with self.lock:
            self.address = 0
            self.configuration = 0
            self.remote_wakeup = False
            self.halted.clear()
        self.reset_state()

    def set_address(self, address: int) -> None:
        """SET_ADDRESS, which the controller itself sends for an Address Device command."""
        with self.lock:
            self.address = address & 0x7F

    @property
    def input_active(self) -> bool:
        """Whether the guest has configured the device (the input hub routes to it then)."""
        return self.configuration != 0

    def control(self, setup: bytes, data: bytes | None) -> bytes | None:
        """One control transfer: the IN data (truncated to wLength), ``b""`` for an OUT
        request that succeeded, or :data:`STALL`."""
        rtype, req, value, index, length = SETUP.unpack(setup)
        kind = (rtype >> 5) & 3
        if kind == 0:
            out = self.standard_request(rtype, req, value, index, length, data)
        elif kind == 1:
            out = self.class_request(rtype, req, value, index, length, data)
        else:
            out = STALL
        if out is not None and rtype & 0x80:
            return bytes(out[:length])
        return out if out is None else b""

    def data_in(self, ep: int, maxlen: int) -> bytes | str:
        return NO_ENDPOINT

    def data_out(self, ep: int, data: bytes) -> bytes | str | None:
        return NO_ENDPOINT

    def close(self) -> None:
        pass

    # -- for subclasses ----------------------------------------------------------------------
    def reset_state(self) -> None:
        """Class state back to power-on (after a bus reset)."""

    def class_request(self, rtype: int, req: int, value: int, index: int, length: int,
                      data: bytes | None) -> bytes | None:
        return STALL

    def class_descriptor(self, dtype: int, index: int) -> bytes | None:
        """GET_DESCRIPTOR to the interface for a class descriptor (HID, report)."""
        return None

    # -- chapter 9 ---------------------------------------------------------------------------
    def standard_request(self, rtype: int, req: int, value: int, index: int, length: int,
                         data: bytes | None) -> bytes | None:
        recipient = rtype & 0x1F
        if req == REQ_GET_DESCRIPTOR and rtype & 0x80:
            if recipient == 0:
                return self.descriptor(value >> 8, value & 0xFF, index)
            if recipient == 1:
                return self.class_descriptor(value >> 8, value & 0xFF)
            return STALL
        if req == REQ_GET_STATUS and rtype & 0x80:
            if recipient == 0:
                return struct.pack("<H", 2 if self.remote_wakeup else 0)
            if recipient == 2:
                return struct.pack("<H", 1 if (index & 0x8F) in self.halted else 0)
            return b"\0\0"
        if req == REQ_GET_CONFIGURATION:
            return bytes([self.configuration])
        if req == REQ_SET_CONFIGURATION:
            if value & 0xFF not in (0, 1):
                return STALL
            with self.lock:
                self.configuration = value & 0xFF
                self.halted.clear()
            return b""
        if req == REQ_SET_ADDRESS:
            self.set_address(value)
            return b""
        if req == REQ_GET_INTERFACE:
            return b"\0" if self.configuration else STALL
        if req == REQ_SET_INTERFACE:
            return b"" if self.configuration and value == 0 and index == 0 else STALL
        if req in (REQ_SET_FEATURE, REQ_CLEAR_FEATURE):
            on = req == REQ_SET_FEATURE
            if recipient == 0 and value == FEATURE_REMOTE_WAKEUP:
                self.remote_wakeup = on
                return b""
            if recipient == 0 and value == 2 and on:      # TEST_MODE: accepted, no effect
                return b""
            if recipient == 2 and value == FEATURE_ENDPOINT_HALT:
                ep = index & 0x8F
                if ep & 0x0F and ep not in self.endpoints:
                    return STALL
                (self.halted.add if on else self.halted.discard)(ep)
                return b""
            return STALL
        return STALL

    def descriptor(self, dtype: int, index: int, langid: int) -> bytes | None:
        if dtype == DT_DEVICE:
            return self.device_descriptor
        if dtype == DT_CONFIG and index == 0:
            return self.config_descriptor
        if dtype == DT_STRING:
            if index == 0:
                return bytes([4, DT_STRING, 0x09, 0x04])         # English (US)
            if index <= len(self.strings):
                return string_descriptor(self.strings[index - 1])
            return STALL
        if dtype == DT_DEVICE_QUALIFIER:
            d = self.device_descriptor
            return bytes([10, DT_DEVICE_QUALIFIER]) + d[2:8] + d[17:18] + b"\0"
        if dtype == DT_OTHER_SPEED and index == 0:
            return self.config_descriptor[:1] + bytes([DT_OTHER_SPEED]) + \
                self.config_descriptor[2:]
        return STALL
