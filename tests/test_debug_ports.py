"""The debug-exit, boot-marker and debugcon ports through the port bus."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vmrun.core import layout
from vmrun.core.bus import PortBus
from vmrun.devices.debug import BootMarker, DebugCon, DebugExit


class Clock:
    def __init__(self) -> None:
        self.t = 5.0

    def __call__(self) -> float:
        self.t += 0.5
        return self.t


def make_bus():
    exits: list[int] = []
    markers: list[tuple[int, float]] = []
    out = bytearray()
    bus = PortBus()
    bus.insert(DebugExit(exits.append), layout.DEBUG_EXIT_PORT, 1)
    bus.insert(BootMarker(lambda v, t: markers.append((v, t)), clock=Clock()),
               layout.BOOT_MARKER_PORT, 1)
    bus.insert(DebugCon(out.extend), layout.DEBUGCON_PORT, 1)
    return bus, exits, markers, out


def test_debug_exit() -> None:
    bus, exits, _, _ = make_bus()
    bus.write(layout.DEBUG_EXIT_PORT, 1, 0x31)
    bus.write(layout.DEBUG_EXIT_PORT, 4, 0x1_0000)
    assert exits == [0x31, 0x1_0000]
    assert bus.read(layout.DEBUG_EXIT_PORT, 1) == 0xFF


def test_boot_markers_are_timestamped() -> None:
    bus, _, markers, _ = make_bus()
    bus.write(layout.BOOT_MARKER_PORT, 1, 1)
    bus.write(layout.BOOT_MARKER_PORT, 1, 2)
    bus.write(layout.BOOT_MARKER_PORT, 2, 0x0403)       # two milestones, low byte first
    assert markers == [(1, 5.5), (2, 6.0), (3, 6.5), (4, 6.5)]
    assert bus.read(layout.BOOT_MARKER_PORT, 1) == 0xFF


def test_debugcon() -> None:
    bus, _, _, out = make_bus()
    for b in b"hi\n":
        bus.write(layout.DEBUGCON_PORT, 1, b)
    bus.write(layout.DEBUGCON_PORT, 2, 0x6B6F)
    assert out == b"hi\nok"
    assert bus.read(layout.DEBUGCON_PORT, 1) == 0xE9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([layout.DEBUG_EXIT_PORT,
                                                          layout.BOOT_MARKER_PORT,
                                                          layout.DEBUGCON_PORT]),
                          st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)),
                max_size=40))
def test_random_accesses(ops) -> None:
    bus, exits, markers, out = make_bus()
    written = 0
    for is_write, port, size, value in ops:
        value &= (1 << (8 * size)) - 1
        if is_write:
            bus.write(port, size, value)
            if port == layout.DEBUGCON_PORT:
                written += size
            if port == layout.DEBUG_EXIT_PORT:
                assert exits[-1] == value
        else:
            assert 0 <= bus.read(port, size) < 1 << (8 * size)
    assert len(out) == written
    assert all(0 <= v <= 0xFF for v, _ in markers)
    assert [t for _, t in markers] == sorted(t for _, t in markers)
