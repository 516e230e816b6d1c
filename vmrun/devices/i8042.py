"""The PS/2 controller (Intel 8042) with a keyboard and a mouse behind it, at ports 0x60/0x64.

One bus device covers 0x60..0x64: offset 0 is the data port, offset 4 the status (read) and
command (write) port; offsets 1-3 (port 0x61 belongs to the PIT/speaker, which KVM's in-kernel
PIT answers before it ever reaches us) read as all ones.

Why it is shaped this way:

* Three sources feed the controller's single output buffer: bytes the controller itself
  produces (command results, and the D2/D3 "write to output buffer" commands, which bypass
  the interface disable bits), the keyboard's queue and the mouse's queue. The buffer is
  refilled from them in that order whenever it is empty and the interface is enabled.
* The OBF interrupts are modelled as pins: IRQ 1 high while the buffer holds keyboard data and
  the command byte enables it, IRQ 12 likewise for AUX data. Reading port 0x60 drops the pin
  before the next byte raises it again, so an edge-triggered PIC sees one edge per byte
  (Linux's handler reads one byte per interrupt).
* Input is processed at once, so IBF is never set.
* ``key_event`` takes scancode set 2 bytes, what a keyboard sends on the wire; with the
  command byte's translation bit set (the PC default) the controller converts them to set 1
  as the real 8042 does. Command responses (ACK, BAT, identify) are delivered untranslated.
  The keyboard's own set selection (command F0) is stored and reported but does not re-encode
  ``key_event`` input.
* Device queues are bounded like the devices' own buffers (16 bytes for the keyboard, so a
  backlog never exceeds what Linux's i8042 flush expects); a full queue drops the whole event
  and ``key_event``/``mouse_event`` return False so a producer can retry.
* Nothing a guest writes grows without bound. The real controller has a one-byte output
  buffer and its firmware waits for the host to read it before producing the next result; we
  answer at once, so at most ``CTRL_QUEUE`` controller bytes wait behind the buffer, oldest
  first, and replies to further commands are dropped (counted in ``ctrl_dropped``) until the
  guest reads. A device's replies to commands may use ``REPLY_ROOM`` bytes beyond its buffer
  (so an ACK is not lost behind queued input); past that the whole reply is dropped
  (``kbd_dropped``, ``aux_dropped``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from vmrun.core.bus import ByteWideDevice
from vmrun.core.devstate import PlainState
from vmrun.core.irq import IrqLine

DATA = 0          # port 0x60
STATUS = 4        # port 0x64 (read: status, write: command)

# Status register.
ST_OBF = 0x01     # output buffer full
ST_IBF = 0x02     # input buffer full (never: input is processed at once)
ST_SYS = 0x04     # system flag (POST passed)
ST_A2 = 0x08      # last write was a command (port 0x64), not data
ST_INH = 0x10     # keyboard inhibit switch: 1 = not inhibited
ST_AUXB = 0x20    # the output buffer holds AUX (mouse) data

# Controller command byte.
CCB_KBD_INT = 0x01
CCB_AUX_INT = 0x02
CCB_SYS = 0x04
CCB_KBD_DISABLE = 0x10
CCB_AUX_DISABLE = 0x20
CCB_XLAT = 0x40
CCB_DEFAULT = CCB_KBD_INT | CCB_SYS | CCB_XLAT   # as a PC BIOS leaves it

# Output port.
OUTPORT_RESET = 0x01      # 0 = hold the CPU in reset
OUTPORT_A20 = 0x02
OUTPORT_KBD_OBF = 0x10
OUTPORT_AUX_OBF = 0x20
OUTPORT_DEFAULT = OUTPORT_RESET | OUTPORT_A20

# Controller commands.
CMD_READ_CCB = 0x20       # 0x20-0x3F read internal RAM, 0x20 being the command byte
CMD_WRITE_CCB = 0x60      # 0x60-0x7F write internal RAM
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPORT = 0xC0
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_WRITE_AUX_OBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE = 0xF0          # 0xF0-0xFF: pulse output port bits 0-3 that are 0 in the command

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
INPORT_VALUE = 0x80       # keyboard not inhibited

# PS/2 device responses and commands.
ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA
ECHO = 0xEE
KBD_ID = b"\xab\x83"      # MF2 keyboard
AUX_ID = 0x00             # standard PS/2 mouse

KBD_SET_LEDS = 0xED
KBD_ECHO = 0xEE
KBD_SCANCODE_SET = 0xF0
KBD_IDENTIFY = 0xF2
KBD_TYPEMATIC = 0xF3
KBD_ENABLE = 0xF4
KBD_DISABLE = 0xF5
KBD_DEFAULTS = 0xF6
KBD_RESEND = 0xFE
KBD_RESET = 0xFF
KBD_TYPEMATIC_DEFAULT = 0x2B   # 10.9 characters/s after 500 ms

AUX_SCALING_1_1 = 0xE6
AUX_SCALING_2_1 = 0xE7
AUX_RESOLUTION = 0xE8
AUX_STATUS = 0xE9
AUX_STREAM_MODE = 0xEA
AUX_READ_DATA = 0xEB
AUX_REMOTE_MODE = 0xF0
AUX_IDENTIFY = 0xF2
AUX_SAMPLE_RATE = 0xF3
AUX_ENABLE = 0xF4
AUX_DISABLE = 0xF5
AUX_DEFAULTS = 0xF6
AUX_RESEND = 0xFE
AUX_RESET = 0xFF

# Mouse packet byte 0 and the ``buttons`` bitmask of mouse_event (PS/2 order).
BUTTON_LEFT = 0x01
BUTTON_RIGHT = 0x02
BUTTON_MIDDLE = 0x04
PACKET_ALWAYS_1 = 0x08
PACKET_X_SIGN = 0x10
PACKET_Y_SIGN = 0x20
PACKET_X_OVERFLOW = 0x40
PACKET_Y_OVERFLOW = 0x80

KBD_QUEUE = 16            # a keyboard's own buffer
AUX_QUEUE = 48            # sixteen mouse packets
CTRL_QUEUE = 16           # controller results waiting behind the one-byte output buffer
REPLY_ROOM = 8            # room for a device's command replies beyond its queue (longest: 4)
REMOTE_MAX = 1 << 16      # remote-mode motion saturates here (reported as overflow anyway)
PACKET_MAX = 255          # the largest count one stream-mode packet carries

# Set 2 -> set 1 for the keys of a 104/105-key keyboard (E0-prefixed keys reuse these codes;
# 0xE0, 0xE1 and responses >= 0x80 pass through; 0xF0 turns the next code into a break).
_SET2_TO_SET1 = {
    0x00: 0xFF, 0x01: 0x43, 0x03: 0x3F, 0x04: 0x3D, 0x05: 0x3B, 0x06: 0x3C, 0x07: 0x58,
    0x09: 0x44, 0x0A: 0x42, 0x0B: 0x40, 0x0C: 0x3E, 0x0D: 0x0F, 0x0E: 0x29, 0x11: 0x38,
    0x12: 0x2A, 0x14: 0x1D, 0x15: 0x10, 0x16: 0x02, 0x1A: 0x2C, 0x1B: 0x1F, 0x1C: 0x1E,
    0x1D: 0x11, 0x1E: 0x03, 0x1F: 0x5B, 0x21: 0x2E, 0x22: 0x2D, 0x23: 0x20, 0x24: 0x12,
    0x25: 0x05, 0x26: 0x04, 0x27: 0x5C, 0x29: 0x39, 0x2A: 0x2F, 0x2B: 0x21, 0x2C: 0x14,
    0x2D: 0x13, 0x2E: 0x06, 0x2F: 0x5D, 0x31: 0x31, 0x32: 0x30, 0x33: 0x23, 0x34: 0x22,
    0x35: 0x15, 0x36: 0x07, 0x3A: 0x32, 0x3B: 0x24, 0x3C: 0x16, 0x3D: 0x08, 0x3E: 0x09,
    0x41: 0x33, 0x42: 0x25, 0x43: 0x17, 0x44: 0x18, 0x45: 0x0B, 0x46: 0x0A, 0x49: 0x34,
    0x4A: 0x35, 0x4B: 0x26, 0x4C: 0x27, 0x4D: 0x19, 0x4E: 0x0C, 0x52: 0x28, 0x54: 0x1A,
    0x55: 0x0D, 0x58: 0x3A, 0x59: 0x36, 0x5A: 0x1C, 0x5B: 0x1B, 0x5D: 0x2B, 0x61: 0x56,
    0x66: 0x0E, 0x69: 0x4F, 0x6B: 0x4B, 0x6C: 0x47, 0x70: 0x52, 0x71: 0x53, 0x72: 0x50,
    0x73: 0x4C, 0x74: 0x4D, 0x75: 0x48, 0x76: 0x01, 0x77: 0x45, 0x78: 0x57, 0x79: 0x4E,
    0x7A: 0x51, 0x7B: 0x4A, 0x7C: 0x37, 0x7D: 0x49, 0x7E: 0x46,
    0x83: 0x41, 0x84: 0x54,   # F7 and Alt+SysRq: the two set-2 codes above 0x7F
}
_XLAT = bytes(_SET2_TO_SET1.get(i, i) for i in range(256))
SET2_BREAK = 0xF0


def translate_set2(data: bytes) -> bytes:
    """Set 2 -> set 1 as the 8042 does with CCB.XLAT: F0 xx becomes (xx translated) | 0x80."""
    out = bytearray()
    brk = False
    for b in data:
        if b == SET2_BREAK:
            brk = True
            continue
        t = _XLAT[b]
        out.append(t | 0x80 if brk else t)
        brk = False
    return bytes(out)


class I8042(PlainState, ByteWideDevice):
    """8042 PS/2 controller + MF2 keyboard + PS/2 mouse; one device at 0x60, five ports."""

    def __init__(self, kbd_irq: IrqLine, aux_irq: IrqLine, on_reset: Callable[[], None]) -> None:
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._on_reset = on_reset
        self._lock = threading.Lock()
        # Controller.
        self._ram = bytearray(32)             # internal RAM; byte 0 is the command byte
        self._ram[0] = CCB_DEFAULT
        self._outport = OUTPORT_DEFAULT
        self._a2 = False
        self._ctrl_param = 0                  # command waiting for its data byte, 0 = none
        self._ctrl: deque[tuple[int, bool]] = deque()    # at most CTRL_QUEUE
        self._ob = 0
        self._obf = False
        self._ob_aux = False
        self._kbd_level = False
        self._aux_level = False
        # Keyboard.
        self._kbd: deque[int] = deque()
        self._kbd_param = 0
        self._kbd_scanning = True
        self._kbd_set = 2
        self._kbd_leds = 0
        self._kbd_typematic = KBD_TYPEMATIC_DEFAULT
        self._kbd_last = ACK
        # Mouse.
        self._aux: deque[int] = deque()
        self._aux_param = 0
        self._aux_last = ACK
        self._aux_defaults()
        self._aux_buttons = 0
        # Replies dropped because the guest wrote commands faster than it read the results.
        self.ctrl_dropped = 0
        self.kbd_dropped = 0
        self.aux_dropped = 0
        #: Called (without the lock) after the guest read the data port.
        self.on_data_read: Callable[[], None] | None = None

    def _aux_defaults(self) -> None:
        self._aux_reporting = False
        self._aux_remote = False
        self._aux_scaling_2_1 = False
        self._aux_resolution = 2              # 4 counts/mm
        self._aux_rate = 100
        self._remote_dx = 0
        self._remote_dy = 0

    # -- public input API (any thread) -------------------------------------------------------
    def key_event(self, scancode_bytes: bytes) -> bool:
        """Queue one key's scancode set 2 bytes (make or F0 break, with E0/E1 prefixes).

        Returns False if the keyboard is not scanning or its buffer has no room (dropped).
        """
        with self._lock:
            if not self._kbd_scanning:
                return False
            data = (translate_set2(scancode_bytes) if self._ram[0] & CCB_XLAT
                    else bytes(scancode_bytes))
            pending = len(self._kbd) + (1 if self._obf and not self._ob_aux else 0)
            if pending + len(data) > KBD_QUEUE:
                return False
            self._kbd.extend(data)
            self._refill()
            return True

    def mouse_event(self, dx: int, dy: int, buttons: int) -> bool:
        """Report relative motion (PS/2 sense: positive dy is up) and the button bitmask.

        Large motions become several standard 3-byte packets (stream mode); in remote mode
        motion accumulates for the guest's read-data command. Returns False when stream-mode
        reporting is off (the guest has not sent F4) or the mouse's buffer has no room.
        """
        with self._lock:
            buttons &= BUTTON_LEFT | BUTTON_RIGHT | BUTTON_MIDDLE
            if self._aux_remote:
                # Remote mode: motion accumulates until the guest polls with EB.
                self._remote_dx = max(-REMOTE_MAX, min(REMOTE_MAX, self._remote_dx + dx))
                self._remote_dy = max(-REMOTE_MAX, min(REMOTE_MAX, self._remote_dy + dy))
                self._aux_buttons = buttons
                return True
            if not self._aux_reporting:
                return False
            if self._aux_scaling_2_1:
                dx, dy = _scale_2_1(dx), _scale_2_1(dy)
            count = max(1, -(-abs(dx) // PACKET_MAX), -(-abs(dy) // PACKET_MAX))
            if len(self._aux) + 3 * count > AUX_QUEUE:
                return False                  # refused before building a single packet
            packets = bytearray()
            for _ in range(count):
                cx = max(-PACKET_MAX, min(PACKET_MAX, dx))
                cy = max(-PACKET_MAX, min(PACKET_MAX, dy))
                packets += _packet(cx, cy, buttons)
                dx -= cx
                dy -= cy
            self._aux_buttons = buttons
            self._aux.extend(packets)
            self._refill()
            return True

    # -- bus device (read/write from ByteWideDevice) -------------------------------------
    def _read_byte(self, offset: int) -> int:
        if offset == DATA:
            with self._lock:
                value = self._ob
                if self._obf:
                    self._obf = False
                    self._update_irq()        # drop the pin: the next byte is a new edge
                    self._refill()
            if self.on_data_read is not None:
                self.on_data_read()           # room again: an input sink's backlog moves
            return value
        if offset == STATUS:
            with self._lock:
                status = ST_INH | (ST_A2 if self._a2 else 0) | (self._ram[0] & CCB_SYS)
                if self._obf:
                    status |= ST_OBF | (ST_AUXB if self._ob_aux else 0)
                return status
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        reset = False
        with self._lock:
            if offset == DATA:
                self._a2 = False
                reset = self._write_data(value)
            elif offset == STATUS:
                self._a2 = True
                reset = self._command(value)
        if reset:
            self._on_reset()

    # -- controller ------------------------------------------------------------------------
    def _command(self, cmd: int) -> bool:
        """Run a controller command; True if it pulses the CPU reset line."""
        self._ctrl_param = 0
        if CMD_READ_CCB <= cmd < CMD_READ_CCB + 0x20:
            self._put_ctrl(self._ram[cmd - CMD_READ_CCB])
        elif (CMD_WRITE_CCB <= cmd < CMD_WRITE_CCB + 0x20
              or cmd in (CMD_WRITE_OUTPORT, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF,
                         CMD_WRITE_AUX)):
            self._ctrl_param = cmd
        elif cmd == CMD_AUX_DISABLE:
            self._set_ccb(self._ram[0] | CCB_AUX_DISABLE)
        elif cmd == CMD_AUX_ENABLE:
            self._set_ccb(self._ram[0] & ~CCB_AUX_DISABLE)
        elif cmd == CMD_AUX_TEST or cmd == CMD_KBD_TEST:
            self._put_ctrl(INTERFACE_OK)
        elif cmd == CMD_SELF_TEST:
            self._ram[0] |= CCB_SYS
            self._put_ctrl(SELF_TEST_OK)
        elif cmd == CMD_KBD_DISABLE:
            self._set_ccb(self._ram[0] | CCB_KBD_DISABLE)
        elif cmd == CMD_KBD_ENABLE:
            self._set_ccb(self._ram[0] & ~CCB_KBD_DISABLE)
        elif cmd == CMD_READ_INPORT:
            self._put_ctrl(INPORT_VALUE)
        elif cmd == CMD_READ_OUTPORT:
            out = self._outport & ~(OUTPORT_KBD_OBF | OUTPORT_AUX_OBF)
            if self._obf:
                out |= OUTPORT_AUX_OBF if self._ob_aux else OUTPORT_KBD_OBF
            self._put_ctrl(out)
        elif cmd >= CMD_PULSE:
            return not cmd & OUTPORT_RESET     # bit 0 low pulses the reset line
        return False

    def _write_data(self, value: int) -> bool:
        cmd = self._ctrl_param
        self._ctrl_param = 0
        if not cmd:
            # Sending to the keyboard re-enables its interface, as 8042 firmware does.
            self._set_ccb(self._ram[0] & ~CCB_KBD_DISABLE)
            self._kbd_command(value)
        elif cmd >= CMD_WRITE_CCB and cmd < CMD_WRITE_CCB + 0x20:
            if cmd == CMD_WRITE_CCB:
                self._set_ccb(value & 0x7F)
            else:
                self._ram[cmd - CMD_WRITE_CCB] = value
        elif cmd == CMD_WRITE_OUTPORT:
            self._outport = value
            return not value & OUTPORT_RESET
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._put_ctrl(value)
        elif cmd == CMD_WRITE_AUX_OBUF:
            self._put_ctrl(value, aux=True)
        elif cmd == CMD_WRITE_AUX:
            self._set_ccb(self._ram[0] & ~CCB_AUX_DISABLE)
            self._aux_command(value)
        return False

    def _set_ccb(self, value: int) -> None:
        self._ram[0] = value
        self._refill()

    def _put_ctrl(self, value: int, aux: bool = False) -> None:
        """A controller result (or a D2/D3 byte): behind at most CTRL_QUEUE others, or lost."""
        if len(self._ctrl) >= CTRL_QUEUE:
            self.ctrl_dropped += 1
            return
        self._ctrl.append((value, aux))
        self._refill()

    def _refill(self) -> None:
        """Load the output buffer if it is empty, then bring both IRQ pins up to date."""
        if not self._obf:
            ccb = self._ram[0]
            if self._ctrl:
                self._ob, self._ob_aux = self._ctrl.popleft()
                self._obf = True
            elif self._kbd and not ccb & CCB_KBD_DISABLE:
                self._ob, self._ob_aux = self._kbd.popleft(), False
                self._obf = True
            elif self._aux and not ccb & CCB_AUX_DISABLE:
                self._ob, self._ob_aux = self._aux.popleft(), True
                self._obf = True
        self._update_irq()

    def _update_irq(self) -> None:
        ccb = self._ram[0]
        kbd = self._obf and not self._ob_aux and bool(ccb & CCB_KBD_INT)
        aux = self._obf and self._ob_aux and bool(ccb & CCB_AUX_INT)
        if kbd != self._kbd_level:
            self._kbd_level = kbd
            self._kbd_irq.set_level(kbd)
        if aux != self._aux_level:
            self._aux_level = aux
            self._aux_irq.set_level(aux)

    # -- keyboard ---------------------------------------------------------------------------
    def _kbd_reply(self, data: bytes) -> None:
        if len(self._kbd) + len(data) > KBD_QUEUE + REPLY_ROOM:
            self.kbd_dropped += 1
            return
        self._kbd.extend(data)
        self._kbd_last = data[-1]
        self._refill()

    def _kbd_command(self, value: int) -> None:
        param = self._kbd_param
        self._kbd_param = 0
        if param and value < KBD_SET_LEDS:   # a command byte instead aborts the parameter
            if param == KBD_SET_LEDS:
                self._kbd_leds = value & 0x07
            elif param == KBD_TYPEMATIC:
                self._kbd_typematic = value & 0x7F
            elif param == KBD_SCANCODE_SET:
                if value == 0:
                    self._kbd_reply(bytes((ACK, self._kbd_set)))
                    return
                if value > 3:
                    self._kbd_reply(bytes((RESEND,)))
                    return
                self._kbd_set = value
            self._kbd_reply(bytes((ACK,)))
            return
        if value in (KBD_SET_LEDS, KBD_TYPEMATIC, KBD_SCANCODE_SET):
            self._kbd_param = value
            self._kbd_reply(bytes((ACK,)))
        elif value == KBD_ECHO:
            self._kbd_reply(bytes((ECHO,)))
        elif value == KBD_IDENTIFY:
            self._kbd_reply(bytes((ACK,)) + KBD_ID)
        elif value == KBD_ENABLE:
            self._kbd_scanning = True
            self._kbd_reply(bytes((ACK,)))
        elif value in (KBD_DISABLE, KBD_DEFAULTS):
            self._kbd.clear()
            self._kbd_scanning = value == KBD_DEFAULTS
            self._kbd_typematic = KBD_TYPEMATIC_DEFAULT
            self._kbd_set = 2
            self._kbd_reply(bytes((ACK,)))
        elif value == KBD_RESET:
            self._kbd.clear()
            self._kbd_scanning = True
            self._kbd_typematic = KBD_TYPEMATIC_DEFAULT
            self._kbd_set = 2
            self._kbd_leds = 0
            self._kbd_reply(bytes((ACK, BAT_OK)))
        elif value == KBD_RESEND:
            self._kbd_reply(bytes((self._kbd_last,)))
        else:
            self._kbd_reply(bytes((RESEND,)))

    # -- mouse ----------------------------------------------------------------------------
    def _aux_reply(self, data: bytes) -> None:
        if len(self._aux) + len(data) > AUX_QUEUE + REPLY_ROOM:
            self.aux_dropped += 1
            return
        self._aux.extend(data)
        self._aux_last = data[-1]
        self._refill()

    def _aux_command(self, value: int) -> None:
        param = self._aux_param
        self._aux_param = 0
        if param and value < AUX_SCALING_1_1:
            if param == AUX_SAMPLE_RATE:
                self._aux_rate = value
            else:
                self._aux_resolution = value & 0x03
            self._aux_reply(bytes((ACK,)))
            return
        if value in (AUX_SAMPLE_RATE, AUX_RESOLUTION):
            self._aux_param = value
            self._aux_reply(bytes((ACK,)))
        elif value == AUX_SCALING_1_1 or value == AUX_SCALING_2_1:
            self._aux_scaling_2_1 = value == AUX_SCALING_2_1
            self._aux_reply(bytes((ACK,)))
        elif value == AUX_STATUS:
            status = ((0x40 if self._aux_remote else 0) | (0x20 if self._aux_reporting else 0)
                      | (0x10 if self._aux_scaling_2_1 else 0) | _status_buttons(self._aux_buttons))
            self._aux_reply(bytes((ACK, status, self._aux_resolution, self._aux_rate)))
        elif value == AUX_STREAM_MODE or value == AUX_REMOTE_MODE:
            self._aux_remote = value == AUX_REMOTE_MODE
            self._remote_dx = self._remote_dy = 0
            self._aux_reply(bytes((ACK,)))
        elif value == AUX_READ_DATA:
            dx, dy = self._remote_dx, self._remote_dy
            self._remote_dx = self._remote_dy = 0
            packet = _packet(max(-256, min(255, dx)), max(-256, min(255, dy)), self._aux_buttons)
            if not -256 <= dx <= 255:
                packet[0] |= PACKET_X_OVERFLOW
            if not -256 <= dy <= 255:
                packet[0] |= PACKET_Y_OVERFLOW
            self._aux_reply(bytes((ACK,)) + packet)
        elif value == AUX_IDENTIFY:
            self._aux_reply(bytes((ACK, AUX_ID)))
        elif value == AUX_ENABLE:
            self._aux_reporting = True
            self._aux_reply(bytes((ACK,)))
        elif value == AUX_DISABLE or value == AUX_DEFAULTS:
            self._aux.clear()
            self._aux_defaults()
            self._aux_reply(bytes((ACK,)))
        elif value == AUX_RESET:
            self._aux.clear()
            self._aux_defaults()
            self._aux_reply(bytes((ACK, BAT_OK, AUX_ID)))
        elif value == AUX_RESEND:
            self._aux_reply(bytes((self._aux_last,)))
        else:
            self._aux_reply(bytes((RESEND,)))


def _packet(dx: int, dy: int, buttons: int) -> bytearray:
    """A standard PS/2 mouse movement packet; dx, dy in -256..255."""
    head = PACKET_ALWAYS_1 | buttons
    if dx < 0:
        head |= PACKET_X_SIGN
    if dy < 0:
        head |= PACKET_Y_SIGN
    return bytearray((head, dx & 0xFF, dy & 0xFF))


def _status_buttons(buttons: int) -> int:
    """Status-request byte 1 orders the buttons left (bit 2), middle (1), right (0)."""
    return (((buttons & BUTTON_LEFT) << 2) | ((buttons & BUTTON_MIDDLE) >> 1)
            | ((buttons & BUTTON_RIGHT) >> 1))


_SCALE_2_1 = (0, 1, 1, 3, 6, 9)


def _scale_2_1(v: int) -> int:
    """2:1 scaling as a PS/2 mouse applies it in stream mode."""
    mag = abs(v)
    out = _SCALE_2_1[mag] if mag < 6 else 2 * mag
    return out if v >= 0 else -out
