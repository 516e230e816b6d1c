"""The 8042 PS/2 controller, keyboard and mouse, through ports 0x60/0x64 and the input API."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from vmrun.core.irq import RecordingIrqLine
from vmrun.devices import i8042 as k
from vmrun.devices.i8042 import I8042, translate_set2


class Rig:
    def __init__(self) -> None:
        self.kbd_irq = RecordingIrqLine()
        self.aux_irq = RecordingIrqLine()
        self.resets = 0
        self.dev = I8042(self.kbd_irq, self.aux_irq, on_reset=self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.dev.read(k.STATUS, 1)

    def cmd(self, value: int) -> None:
        self.dev.write(k.STATUS, 1, value)

    def data(self, value: int) -> None:
        self.dev.write(k.DATA, 1, value)

    def drain(self) -> list[tuple[int, bool]]:
        """Read everything pending, as Linux's i8042 flush does: (byte, from AUX)."""
        out = []
        while (st_ := self.status()) & k.ST_OBF:
            out.append((self.dev.read(k.DATA, 1), bool(st_ & k.ST_AUXB)))
        return out

    def drain_bytes(self) -> bytes:
        return bytes(b for b, _ in self.drain())

    def ctr(self) -> int:
        self.cmd(k.CMD_READ_CCB)
        return self.drain_bytes()[0]


def test_status_after_power_on() -> None:
    rig = Rig()
    assert rig.status() == k.ST_INH | k.ST_SYS
    assert rig.ctr() == k.CCB_DEFAULT
    assert rig.status() & k.ST_A2                       # last write went to the command port
    rig.data(k.KBD_ECHO)
    assert not rig.status() & k.ST_A2
    for off in (1, 2, 3):
        assert rig.dev.read(off, 1) == 0xFF


def test_self_tests() -> None:
    rig = Rig()
    rig.cmd(k.CMD_SELF_TEST)
    assert rig.drain() == [(0x55, False)]
    rig.cmd(k.CMD_KBD_TEST)
    assert rig.drain() == [(0x00, False)]
    rig.cmd(k.CMD_AUX_TEST)
    assert rig.drain() == [(0x00, False)]
    rig.cmd(k.CMD_READ_INPORT)
    assert len(rig.drain()) == 1


def test_command_byte_and_interface_bits() -> None:
    rig = Rig()
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(0x47)
    assert rig.ctr() == 0x47
    rig.cmd(k.CMD_AUX_DISABLE)
    assert rig.ctr() & k.CCB_AUX_DISABLE
    rig.cmd(k.CMD_AUX_ENABLE)
    assert not rig.ctr() & k.CCB_AUX_DISABLE
    rig.cmd(k.CMD_KBD_DISABLE)
    assert rig.ctr() & k.CCB_KBD_DISABLE
    rig.cmd(k.CMD_KBD_ENABLE)
    assert not rig.ctr() & k.CCB_KBD_DISABLE
    rig.cmd(0x65)                                       # internal RAM byte 5
    rig.data(0x99)
    rig.cmd(0x25)
    assert rig.drain_bytes() == b"\x99"


def test_keyboard_reset_and_identify() -> None:
    rig = Rig()
    rig.data(k.KBD_RESET)
    assert rig.drain() == [(k.ACK, False), (k.BAT_OK, False)]
    rig.data(k.KBD_IDENTIFY)
    assert rig.drain_bytes() == b"\xfa\xab\x83"
    rig.data(k.KBD_ECHO)
    assert rig.drain_bytes() == b"\xee"
    rig.data(0x12)                                      # not a command
    assert rig.drain_bytes() == b"\xfe"


def test_keyboard_parameter_commands() -> None:
    rig = Rig()
    rig.data(k.KBD_SET_LEDS)
    assert rig.drain_bytes() == b"\xfa"
    rig.data(0x07)
    assert rig.drain_bytes() == b"\xfa"
    rig.data(k.KBD_SCANCODE_SET)
    rig.data(0)
    assert rig.drain_bytes() == b"\xfa\xfa\x02"
    rig.data(k.KBD_SCANCODE_SET)
    rig.data(3)
    rig.data(k.KBD_SCANCODE_SET)
    rig.data(0)
    assert rig.drain_bytes() == b"\xfa\xfa\xfa\xfa\x03"
    rig.data(k.KBD_TYPEMATIC)
    rig.data(0x20)
    assert rig.drain_bytes() == b"\xfa\xfa"
    rig.data(k.KBD_SET_LEDS)
    rig.data(k.KBD_IDENTIFY)                            # a command instead of the LED byte
    assert rig.drain_bytes() == b"\xfa\xfa\xab\x83"
    rig.data(k.KBD_DEFAULTS)
    rig.data(k.KBD_RESEND)
    assert rig.drain_bytes() == b"\xfa\xfa"


def test_keyboard_enable_disable_and_key_events() -> None:
    rig = Rig()
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(k.CCB_KBD_INT | k.CCB_SYS)                 # no translation
    assert rig.dev.key_event(b"\x1c")                   # 'A' make, set 2
    assert rig.kbd_irq.level
    assert rig.drain_bytes() == b"\x1c"
    assert not rig.kbd_irq.level
    rig.data(k.KBD_DISABLE)
    assert rig.drain_bytes() == b"\xfa"
    assert not rig.dev.key_event(b"\x1c")
    rig.data(k.KBD_ENABLE)
    assert rig.drain_bytes() == b"\xfa"
    assert rig.dev.key_event(b"\xf0\x1c")
    assert rig.drain_bytes() == b"\xf0\x1c"


def test_translation_to_set1() -> None:
    assert translate_set2(b"\x1c") == b"\x1e"                        # A make
    assert translate_set2(b"\xf0\x1c") == b"\x9e"                    # A break
    assert translate_set2(b"\xe0\x75") == b"\xe0\x48"                # Up
    assert translate_set2(b"\xe0\xf0\x14") == b"\xe0\x9d"            # right Ctrl break
    assert translate_set2(b"\x83") == b"\x41"                        # F7
    assert translate_set2(b"\xe1\x14\x77\xe1\xf0\x14\xf0\x77") == b"\xe1\x1d\x45\xe1\x9d\xc5"
    rig = Rig()                                         # the default CCB translates
    assert rig.dev.key_event(b"\x5a")
    assert rig.drain_bytes() == b"\x1c"                 # Enter


def test_keyboard_queue_is_bounded() -> None:
    rig = Rig()
    accepted = sum(rig.dev.key_event(b"\x1c") for _ in range(40))
    assert accepted == k.KBD_QUEUE
    # Linux's flush reads at most 16 bytes before declaring the controller stuck.
    assert len(rig.drain()) <= 16


def test_irq_edges_per_byte_and_enable_bits() -> None:
    rig = Rig()
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(k.CCB_SYS)                                 # interrupts off
    rig.dev.key_event(b"\x1c\x1b")
    assert not rig.kbd_irq.changes
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(k.CCB_SYS | k.CCB_KBD_INT)                 # enabling raises the pin at once
    assert rig.kbd_irq.level
    rig.dev.read(k.DATA, 1)
    rig.dev.read(k.DATA, 1)
    assert not rig.kbd_irq.level
    assert rig.kbd_irq.changes == [True, False, True, False]   # one edge per byte
    assert not rig.aux_irq.changes


def test_disabled_keyboard_interface_holds_data() -> None:
    rig = Rig()
    rig.cmd(k.CMD_KBD_DISABLE)
    rig.dev.key_event(b"\x1c")
    assert not rig.status() & k.ST_OBF
    rig.cmd(k.CMD_KBD_ENABLE)
    assert rig.drain_bytes() == b"\x1e"


def test_write_to_output_buffers() -> None:
    rig = Rig()
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(k.CCB_SYS | k.CCB_KBD_INT | k.CCB_AUX_INT | k.CCB_AUX_DISABLE)
    rig.cmd(k.CMD_WRITE_KBD_OBUF)
    rig.data(0x42)
    assert rig.kbd_irq.level
    assert rig.drain() == [(0x42, False)]
    rig.cmd(k.CMD_WRITE_AUX_OBUF)                       # Linux's AUX loop test
    rig.data(0x5A)
    assert rig.status() & (k.ST_OBF | k.ST_AUXB) == k.ST_OBF | k.ST_AUXB
    assert rig.aux_irq.level and not rig.kbd_irq.level
    assert rig.drain() == [(0x5A, True)]
    assert not rig.aux_irq.level


def test_linux_i8042_probe_sequence() -> None:
    rig = Rig()
    rig.drain()
    rig.cmd(k.CMD_SELF_TEST)
    assert rig.drain_bytes() == b"\x55"
    ctr = rig.ctr()
    ctr = (ctr | k.CCB_KBD_DISABLE) & ~k.CCB_KBD_INT
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(ctr)
    # check_aux: loop, toggle AUXDIS both ways (read back through the CTR), then IRQ test.
    rig.cmd(k.CMD_WRITE_AUX_OBUF)
    rig.data(0x5A)
    assert rig.drain() == [(0x5A, True)]
    rig.cmd(k.CMD_AUX_DISABLE)
    assert rig.ctr() & k.CCB_AUX_DISABLE
    rig.cmd(k.CMD_AUX_ENABLE)
    assert not rig.ctr() & k.CCB_AUX_DISABLE
    ctr = (rig.ctr() & ~k.CCB_AUX_DISABLE) | k.CCB_AUX_INT
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(ctr)
    before = rig.aux_irq.raised_count
    rig.cmd(k.CMD_WRITE_AUX_OBUF)
    rig.data(0xA5)
    assert rig.aux_irq.raised_count == before + 1
    assert rig.drain() == [(0xA5, True)]
    # Keyboard port open: interrupts on, interface enabled, then atkbd's probe.
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data((ctr | k.CCB_KBD_INT) & ~k.CCB_KBD_DISABLE)
    before = rig.kbd_irq.raised_count
    rig.data(k.KBD_IDENTIFY)
    assert rig.drain_bytes() == b"\xfa\xab\x83"
    assert rig.kbd_irq.raised_count == before + 3


def test_mouse_commands() -> None:
    rig = Rig()
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_RESET)
    assert rig.drain() == [(k.ACK, True), (k.BAT_OK, True), (0x00, True)]
    for command, reply in ((k.AUX_IDENTIFY, b"\xfa\x00"), (k.AUX_SCALING_2_1, b"\xfa"),
                           (k.AUX_SCALING_1_1, b"\xfa"), (k.AUX_STREAM_MODE, b"\xfa"),
                           (k.AUX_DEFAULTS, b"\xfa"), (0x00, b"\xfe")):
        rig.cmd(k.CMD_WRITE_AUX)
        rig.data(command)
        assert rig.drain_bytes() == reply, hex(command)
    for command, arg in ((k.AUX_SAMPLE_RATE, 200), (k.AUX_RESOLUTION, 3)):
        rig.cmd(k.CMD_WRITE_AUX)
        rig.data(command)
        rig.cmd(k.CMD_WRITE_AUX)
        rig.data(arg)
        assert rig.drain_bytes() == b"\xfa\xfa"
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_SCALING_2_1)
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_ENABLE)
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_STATUS)
    assert rig.drain() == [(b, True) for b in (0xFA, 0xFA, 0xFA, 0x30, 3, 200)]
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_DISABLE)
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_STATUS)
    assert rig.drain_bytes() == b"\xfa\xfa\x00\x02\x64"   # F5 also restores the defaults


def _enable_mouse(rig: Rig) -> None:
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(k.CCB_SYS | k.CCB_KBD_INT | k.CCB_AUX_INT | k.CCB_XLAT)
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_ENABLE)
    assert rig.drain() == [(k.ACK, True)]


def test_mouse_packets() -> None:
    rig = Rig()
    assert not rig.dev.mouse_event(1, 1, 0)             # reporting is off after power-on
    _enable_mouse(rig)
    assert rig.dev.mouse_event(5, -3, k.BUTTON_LEFT | k.BUTTON_MIDDLE)
    assert rig.aux_irq.level
    assert rig.drain() == [(0x08 | 0x20 | 0x05, True), (5, True), (0xFD, True)]
    assert rig.dev.mouse_event(-300, 0, 0)              # split into two packets
    assert rig.drain_bytes() == bytes((0x18, 0x01, 0, 0x18, 0xD3, 0))
    assert not rig.kbd_irq.changes


def test_mouse_remote_mode() -> None:
    rig = Rig()
    _enable_mouse(rig)
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_REMOTE_MODE)
    rig.drain()
    assert rig.dev.mouse_event(10, 20, k.BUTTON_RIGHT)
    assert rig.dev.mouse_event(1, 1, k.BUTTON_RIGHT)
    assert not rig.status() & k.ST_OBF
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_READ_DATA)
    assert rig.drain_bytes() == bytes((0xFA, 0x0A, 11, 21))


def test_reset_pulses() -> None:
    rig = Rig()
    rig.cmd(0xFE)
    assert rig.resets == 1
    rig.cmd(0xFF)                                       # no bit low: no pulse
    rig.cmd(0xF1)                                       # bit 0 high: no reset
    assert rig.resets == 1
    rig.cmd(0xF0)
    assert rig.resets == 2
    rig.cmd(k.CMD_READ_OUTPORT)
    out = rig.drain_bytes()[0]
    assert out & k.OUTPORT_RESET
    rig.cmd(k.CMD_WRITE_OUTPORT)
    rig.data(out | k.OUTPORT_A20)
    assert rig.resets == 2
    rig.cmd(k.CMD_WRITE_OUTPORT)
    rig.data(out & ~k.OUTPORT_RESET)
    assert rig.resets == 3


def test_events_from_other_threads() -> None:
    rig = Rig()
    _enable_mouse(rig)
    rig.cmd(k.CMD_WRITE_CCB)
    rig.data(k.CCB_SYS | k.CCB_KBD_INT | k.CCB_AUX_INT)   # raw set 2
    got_kbd = bytearray()
    got_aux = bytearray()
    stop = threading.Event()

    def typist() -> None:
        for _ in range(200):
            while not rig.dev.key_event(b"\x1c") and not stop.is_set():
                pass

    def mouse() -> None:
        for _ in range(200):
            while not rig.dev.mouse_event(1, 2, 0) and not stop.is_set():
                pass

    threads = [threading.Thread(target=typist), threading.Thread(target=mouse)]
    for t in threads:
        t.start()
    while len(got_kbd) < 200 or len(got_aux) < 600:
        for b, aux in rig.drain():
            (got_aux if aux else got_kbd).append(b)
    stop.set()
    for t in threads:
        t.join(5)
    assert got_kbd == b"\x1c" * 200
    assert got_aux == bytes((0x08, 1, 2)) * 200


def test_wide_accesses_split_into_bytes() -> None:
    rig = Rig()
    assert rig.dev.read(1, 2) == 0xFFFF
    assert rig.dev.read(1, 4) == 0xFFFFFF | rig.status() << 24
    rig.dev.write(3, 2, k.CMD_SELF_TEST << 8)           # the byte at offset 4 is a command
    assert rig.drain_bytes() == b"\x55"


_ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.sampled_from([0, 1, 2, 3, 4]), st.integers(0, 255)),
    st.tuples(st.just("r"), st.sampled_from([0, 1, 2, 3, 4]), st.just(0)),
    st.tuples(st.just("key"), st.just(0), st.integers(0, 255)),
    st.tuples(st.just("mouse"), st.integers(-400, 400), st.integers(0, 7)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_random_accesses_keep_invariants(ops) -> None:
    rig = Rig()
    for kind, a, b in ops:
        if kind == "w":
            rig.dev.write(a, 1, b)
        elif kind == "r":
            assert 0 <= rig.dev.read(a, 1) <= 0xFF
        elif kind == "key":
            rig.dev.key_event(bytes((b,)))
        else:
            rig.dev.mouse_event(a, -a, b)
        status = rig.status()
        assert not status & k.ST_IBF
        assert status & k.ST_INH
        if not status & k.ST_OBF:
            assert not status & k.ST_AUXB
            assert not rig.kbd_irq.level and not rig.aux_irq.level
        assert not (rig.kbd_irq.level and rig.aux_irq.level)
        if rig.aux_irq.level:
            assert status & k.ST_AUXB
        if rig.kbd_irq.level:
            assert status & k.ST_OBF and not status & k.ST_AUXB
    assert rig.resets >= 0


# -- guest write loops: every queue stays bounded ----------------------------------------------
FLOOD = 1_000_000
CTRL_MAX = getattr(k, "CTRL_QUEUE", 16)        # pending controller bytes behind the buffer
KBD_MAX = getattr(k, "KBD_QUEUE", 16) + getattr(k, "REPLY_ROOM", 8)
AUX_MAX = getattr(k, "AUX_QUEUE", 48) + getattr(k, "REPLY_ROOM", 8)


def test_controller_reply_flood_stays_bounded() -> None:
    """A guest loop writing reply-producing commands to 0x64 without reading 0x60 (it grew
    the reply queue to 16 MB): at most CTRL_QUEUE bytes wait behind the one-byte output
    buffer, further replies are dropped and counted, and the controller still answers."""
    rig = Rig()
    cmds = (k.CMD_READ_CCB, k.CMD_SELF_TEST, k.CMD_KBD_TEST, k.CMD_AUX_TEST,
            k.CMD_READ_INPORT, k.CMD_READ_OUTPORT)
    write = rig.dev.write
    for i in range(FLOOD):
        write(k.STATUS, 1, cmds[i % len(cmds)])
        if i % 4096 == 0:
            assert len(rig.dev._ctrl) <= CTRL_MAX
    assert len(rig.dev._ctrl) <= CTRL_MAX
    assert rig.dev.ctrl_dropped == FLOOD - 1 - CTRL_MAX
    assert rig.status() & k.ST_OBF and rig.kbd_irq.level
    first = rig.drain_bytes()
    assert first[:3] == bytes((k.CCB_DEFAULT, 0x55, 0x00))   # the oldest replies, in order
    assert len(first) == 1 + CTRL_MAX
    assert not rig.status() & k.ST_OBF and not rig.kbd_irq.level
    # Read empty, it answers each command again (no stale bytes left, no drops).
    assert rig.ctr() == k.CCB_DEFAULT
    rig.cmd(k.CMD_SELF_TEST)
    assert rig.drain() == [(0x55, False)]
    rig.data(k.KBD_ECHO)
    assert rig.drain() == [(k.ECHO, False)]
    assert rig.dev.key_event(b"\x1c")
    assert rig.drain() == [(0x1E, False)]
    assert rig.dev.ctrl_dropped == FLOOD - 1 - CTRL_MAX


def test_write_output_buffer_flood_stays_bounded() -> None:
    rig = Rig()
    for i in range(FLOOD // 2):
        rig.cmd(k.CMD_WRITE_AUX_OBUF if i & 1 else k.CMD_WRITE_KBD_OBUF)
        rig.data(i & 0xFF)
    assert len(rig.dev._ctrl) <= CTRL_MAX
    got = rig.drain()
    assert got[:3] == [(0, False), (1, True), (2, False)] and len(got) == 1 + CTRL_MAX
    rig.cmd(k.CMD_WRITE_AUX_OBUF)
    rig.data(0x5A)
    assert rig.drain() == [(0x5A, True)]


def test_keyboard_command_flood_stays_bounded() -> None:
    """Keyboard commands written to 0x60 in a loop: the keyboard's replies are bounded too."""
    rig = Rig()
    write = rig.dev.write
    for i in range(FLOOD):
        write(k.DATA, 1, k.KBD_ECHO if i & 1 else k.KBD_IDENTIFY)
        if i % 4096 == 0:
            assert len(rig.dev._kbd) <= KBD_MAX
    assert len(rig.dev._kbd) <= KBD_MAX
    assert rig.dev.kbd_dropped > 0
    assert len(rig.drain()) <= 1 + KBD_MAX
    rig.data(k.KBD_IDENTIFY)
    assert rig.drain_bytes() == bytes((k.ACK,)) + k.KBD_ID
    assert rig.dev.key_event(b"\x1c")
    assert rig.drain_bytes() == b"\x1e"


def test_mouse_command_flood_stays_bounded() -> None:
    rig = Rig()
    write = rig.dev.write
    for i in range(FLOOD // 2):
        write(k.STATUS, 1, k.CMD_WRITE_AUX)
        write(k.DATA, 1, k.AUX_STATUS if i & 1 else k.AUX_READ_DATA)
        if i % 4096 == 0:
            assert len(rig.dev._aux) <= AUX_MAX
    assert len(rig.dev._aux) <= AUX_MAX
    assert rig.dev.aux_dropped > 0
    assert len(rig.drain()) <= 1 + AUX_MAX
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_IDENTIFY)
    assert rig.drain() == [(k.ACK, True), (k.AUX_ID, True)]


def test_huge_motion_is_refused_without_building_packets(monkeypatch) -> None:
    """A motion that needs more packets than the mouse buffer holds is refused up front (it
    used to build every packet first: 4 million of them for a count of 10**9)."""
    rig = Rig()
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_ENABLE)
    assert rig.drain() == [(k.ACK, True)]
    built = []
    packet = k._packet
    monkeypatch.setattr(k, "_packet", lambda *a: built.append(a) or packet(*a))
    assert not rig.dev.mouse_event(10**7, 0, 0)
    assert not rig.dev.mouse_event(0, -(10**7), 0)
    assert len(built) <= k.AUX_QUEUE // 3
    assert rig.dev.mouse_event(255 * (k.AUX_QUEUE // 3), 0, 0)
    assert len(rig.drain()) == k.AUX_QUEUE


def test_remote_mode_motion_saturates() -> None:
    rig = Rig()
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_REMOTE_MODE)
    rig.drain()
    for _ in range(1000):
        rig.dev.mouse_event(10**12, -(10**12), 0)
    assert abs(rig.dev._remote_dx) <= 1 << 16 and abs(rig.dev._remote_dy) <= 1 << 16
    rig.cmd(k.CMD_WRITE_AUX)
    rig.data(k.AUX_READ_DATA)
    ack, head, dx, dy = rig.drain_bytes()
    assert ack == k.ACK and head & k.PACKET_X_OVERFLOW and head & k.PACKET_Y_OVERFLOW
    assert (dx, dy) == (0xFF, 0x00)            # +255 and -256, the largest counts
