"""Keys typed faster than the guest reads them (a VNC client sends a whole string at once)
wait in the i8042 sink and reach the guest in order, as it reads the data port."""

from __future__ import annotations

from vmrun.core.input import InputHub
from vmrun.core.irq import RecordingIrqLine
from vmrun.devices.i8042 import I8042
from vmrun.devices.ps2_input import BACKLOG_KEYS, Ps2InputSink


def _kbd() -> tuple[I8042, Ps2InputSink, InputHub]:
    dev = I8042(RecordingIrqLine(), RecordingIrqLine(), on_reset=lambda: None)
    sink = Ps2InputSink(dev)
    hub = InputHub()
    hub.attach(sink)
    dev.write(0, 1, 0xF4)                    # keyboard: enable scanning
    while dev.read(4, 1) & 1:
        dev.read(0, 1)                       # the ACK
    return dev, sink, hub


def _read_all(dev: I8042) -> list[int]:
    got = []
    while dev.read(4, 1) & 1:
        got.append(dev.read(0, 1))
    return got


def test_a_burst_of_keys_arrives_in_order() -> None:
    dev, sink, hub = _kbd()
    for _ in range(40):                      # 80 scancodes: five times the keyboard's buffer
        hub.key(30, True)
        hub.key(30, False)
    hub.key(103, True)                       # an extended key: E0 48 after translation
    got = _read_all(dev)
    assert got == [0x1E, 0x9E] * 40 + [0xE0, 0x48]
    assert sink.dropped == 0


def test_the_backlog_is_bounded_and_dropped_when_scanning_stops() -> None:
    dev, sink, hub = _kbd()
    for _ in range(BACKLOG_KEYS + 50):
        hub.key(30, True)
    assert sink.dropped > 0
    dev.write(0, 1, 0xF5)                    # disable scanning: the ACK, then nothing more
    got = _read_all(dev)
    assert len(got) < 40
    hub.key(31, True)
    assert _read_all(dev) == []
