"""The 16550A model, driven only through its eight ports and ``feed``, as a guest driver would."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from vmrun.core.irq import RecordingIrqLine
from vmrun.devices import uart as u
from vmrun.devices.uart import Uart16550


class Rig:
    """A UART, its IRQ pin and what it transmitted."""

    def __init__(self, rx_backlog: int = u.RX_BACKLOG) -> None:
        self.irq = RecordingIrqLine()
        self.sent = bytearray()
        self.dev = Uart16550(self.irq, self.sent.extend, rx_backlog=rx_backlog)

    def rd(self, reg: int) -> int:
        return self.dev.read(reg, 1)

    def wr(self, reg: int, value: int) -> None:
        self.dev.write(reg, 1, value)


def linux_style_probe(r: Rig) -> str:
    """The probe sequence of Linux's 8250 autoconfig(), restated step by step.

    Returns the type name the driver would settle on.
    """
    # Existence test: IER must read back 0 and then 0x0F (low nibble).
    saved_ier = r.rd(u.IER)
    r.wr(u.IER, 0)
    scratch2 = r.rd(u.IER) & 0x0F
    r.wr(u.IER, 0x0F)
    scratch3 = r.rd(u.IER) & 0x0F
    r.wr(u.IER, saved_ier)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none (IER test)"
    save_mcr = r.rd(u.MCR)
    save_lcr = r.rd(u.LCR)
    # Loopback test: RTS|OUT2 in loopback must show CTS|DCD.
    r.wr(u.MCR, u.MCR_LOOP | 0x0A)
    status = r.rd(u.MSR) & 0xF0
    r.wr(u.MCR, save_mcr)
    if status != 0x90:
        return "none (loopback test)"
    # Clear a possible EFR (same address as FCR under LCR=0xBF), then enable the FIFOs.
    r.wr(u.LCR, 0xBF)
    r.wr(2, 0)
    r.wr(u.LCR, 0)
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)
    kind = {0: "8250/16450", 1: "unknown", 2: "16550", 3: "16550A"}[r.rd(u.IIR) >> 6]
    if kind == "16550A":
        kind = _probe_16550a(r)
    r.wr(u.LCR, save_lcr)
    # Reset the UART as the driver leaves it.
    r.wr(u.MCR, save_mcr)
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)
    r.wr(u.FCR, u.FCR_FIFO_ENABLE | u.FCR_RCVR_RESET | u.FCR_XMIT_RESET)
    r.wr(u.FCR, 0)
    r.rd(u.RBR)
    r.wr(u.IER, 0)
    return kind


def _probe_16550a(r: Rig) -> str:
    # EFR visible with DLAB set: a ST16C650V1.
    r.wr(u.LCR, 0x80)
    if r.rd(2) == 0:
        return "ST16650"
    # EFR visible with LCR=0xBF: ST16C650V2 and friends.
    r.wr(u.LCR, 0xBF)
    if r.rd(2) == 0:
        return "ST16650V2"
    # National SuperIO: EXCR1 in bank 2 (LCR=0xE0) mirrors MCR.LOOP.
    r.wr(u.LCR, 0)
    mcr = r.rd(u.MCR)
    r.wr(u.LCR, 0xE0)
    excr1 = r.rd(2)
    if not (excr1 ^ mcr) & u.MCR_LOOP:
        r.wr(u.LCR, 0)
        r.wr(u.MCR, mcr ^ u.MCR_LOOP)
        r.wr(u.LCR, 0xE0)
        excr1 = r.rd(2)
        r.wr(u.LCR, 0)
        r.wr(u.MCR, mcr)
        if (excr1 ^ mcr) & u.MCR_LOOP:
            return "NS16550A"
    # TI16750: IIR bit 5 only when the 64-byte FIFO bit is set under DLAB.
    r.wr(u.LCR, 0)
    r.wr(u.FCR, u.FCR_FIFO_ENABLE | 0x20)
    s1 = r.rd(u.IIR) >> 5
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)
    r.wr(u.LCR, 0x80)
    r.wr(u.FCR, u.FCR_FIFO_ENABLE | 0x20)
    s2 = r.rd(u.IIR) >> 5
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)
    r.wr(u.LCR, 0)
    if s1 == 6 and s2 == 7:
        return "TI16750"
    # XScale: IER bit 6 (UUE) writable.
    ier = r.rd(u.IER)
    r.wr(u.IER, ier & ~0x40)
    if not r.rd(u.IER) & 0x40:
        r.wr(u.IER, ier | 0x40)
        if r.rd(u.IER) & 0x40:
            return "XScale"
    r.wr(u.IER, ier)
    # U6 16550A has a 64-byte FIFO: count bytes that survive a 256-byte loopback burst.
    if _size_fifo(r) == 64:
        return "U6_16550A"
    return "16550A"


def _size_fifo(r: Rig) -> int:
    old_lcr = r.rd(u.LCR)
    r.wr(u.LCR, 0)
    old_fcr = r.rd(u.IIR)
    old_mcr = r.rd(u.MCR)
    r.wr(u.FCR, u.FCR_FIFO_ENABLE | u.FCR_RCVR_RESET | u.FCR_XMIT_RESET)
    r.wr(u.MCR, u.MCR_LOOP)
    r.wr(u.LCR, 0x80)
    old_dl = r.rd(u.DLL) | r.rd(u.DLM) << 8
    r.wr(u.DLL, 1)
    r.wr(u.DLM, 0)
    r.wr(u.LCR, 0x03)
    for i in range(256):
        r.wr(u.THR, i)
    count = 0
    while r.rd(u.LSR) & u.LSR_DR and count < 256:
        r.rd(u.RBR)
        count += 1
    r.wr(u.FCR, old_fcr)
    r.wr(u.MCR, old_mcr)
    r.wr(u.LCR, 0x80)
    r.wr(u.DLL, old_dl & 0xFF)
    r.wr(u.DLM, old_dl >> 8)
    r.wr(u.LCR, old_lcr)
    return count


def test_linux_autoconfig_identifies_16550a() -> None:
    r = Rig()
    assert linux_style_probe(r) == "16550A"
    assert r.sent == b""                       # the probe's loopback bytes never left
    assert r.rd(u.LSR) == u.LSR_THRE | u.LSR_TEMT
    assert r.rd(u.IIR) == u.IIR_NO_INT         # FIFOs off again, nothing pending


def test_size_fifo_counts_sixteen() -> None:
    r = Rig()
    assert _size_fifo(r) == 16


def test_linux_startup_thre_tests() -> None:
    """serial8250_do_startup: enabling ETBEI with THR empty must interrupt, every time."""
    r = Rig()
    r.wr(u.MCR, u.MCR_DTR | u.MCR_RTS | u.MCR_OUT2)
    r.wr(u.IER, u.IER_ETBEI)
    assert r.rd(u.LSR) & u.LSR_TEMT
    iir1 = r.rd(u.IIR)
    r.wr(u.IER, 0)
    r.wr(u.IER, u.IER_ETBEI)
    iir2 = r.rd(u.IIR)
    r.wr(u.IER, 0)
    assert iir1 == u.IIR_THRE and iir2 == u.IIR_THRE
    assert r.irq.raised_count == 2


def test_autoconfig_irq_sees_an_edge() -> None:
    """autoconfig_irq: all interrupts on, read the sources clear, write one byte -> IRQ."""
    r = Rig()
    r.wr(u.MCR, u.MCR_OUT1 | u.MCR_OUT2)
    r.wr(u.MCR, 0)
    r.wr(u.MCR, u.MCR_DTR | u.MCR_RTS | u.MCR_OUT2)
    r.wr(u.IER, 0x0F)
    for reg in (u.LSR, u.RBR, u.IIR, u.MSR):
        r.rd(reg)
    before = r.irq.raised_count
    assert not r.irq.level
    r.wr(u.THR, 0xFF)
    assert r.irq.raised_count == before + 1
    assert r.sent == b"\xff"


def test_scratch_lcr_dlab_and_divisor() -> None:
    r = Rig()
    r.wr(u.SCR, 0x5A)
    assert r.rd(u.SCR) == 0x5A
    r.wr(u.IER, 0x05)
    r.wr(u.LCR, u.LCR_DLAB | 0x03)
    r.wr(u.DLL, 0x0C)
    r.wr(u.DLM, 0x01)
    assert (r.rd(u.DLL), r.rd(u.DLM)) == (0x0C, 0x01)
    assert r.sent == b""                       # DLL write is not a transmit
    r.wr(u.LCR, 0x03)
    assert r.rd(u.LCR) == 0x03
    assert r.rd(u.IER) == 0x05
    r.wr(u.IER, 0xFF)
    assert r.rd(u.IER) == 0x0F                 # only the four enables exist


def test_transmit_is_immediate() -> None:
    r = Rig()
    for b in b"hello\n":
        r.wr(u.THR, b)
    assert r.sent == b"hello\n"
    assert r.rd(u.LSR) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT


def test_thre_interrupt_on_off() -> None:
    r = Rig()
    r.wr(u.MCR, u.MCR_OUT2)
    assert not r.irq.level
    r.wr(u.IER, u.IER_ETBEI)
    assert r.irq.level
    assert r.rd(u.IIR) == u.IIR_THRE           # reading IIR (THRE the source) clears it
    assert not r.irq.level
    assert r.rd(u.IIR) == u.IIR_NO_INT
    r.wr(u.THR, ord("x"))                      # THR empties at once: re-armed
    assert r.irq.level
    r.wr(u.IER, 0)                             # disabling the source drops the pin
    assert not r.irq.level
    r.wr(u.IER, u.IER_ETBEI)
    assert r.irq.level
    r.wr(u.THR, ord("y"))                      # a write clears and re-arms: still pending
    assert r.rd(u.IIR) == u.IIR_THRE
    assert not r.irq.level


def test_out2_gates_the_pin() -> None:
    r = Rig()
    r.wr(u.IER, u.IER_ETBEI)
    assert r.rd(u.IIR) == u.IIR_THRE
    r.wr(u.IER, 0)
    r.wr(u.IER, u.IER_ETBEI)
    assert not r.irq.level                     # pending, but OUT2 is low
    r.wr(u.MCR, u.MCR_OUT2)
    assert r.irq.level
    r.wr(u.MCR, 0)
    assert not r.irq.level
    r.wr(u.MCR, u.MCR_OUT2)
    assert r.irq.level


def test_ungated_pin_for_pci() -> None:
    irq = RecordingIrqLine()
    dev = Uart16550(irq, lambda data: None, out2_gates_irq=False)
    dev.write(u.IER, 1, u.IER_ETBEI)
    assert irq.level                           # no OUT2 needed
    dev.read(u.IIR, 1)
    assert not irq.level


def test_receive_without_fifo() -> None:
    r = Rig()
    r.wr(u.MCR, u.MCR_OUT2)
    r.wr(u.IER, u.IER_ERBFI)
    assert r.dev.feed(b"ab") == 2
    assert r.irq.level
    assert r.rd(u.IIR) == u.IIR_RDA            # FIFOs off: one byte is the trigger
    assert r.rd(u.LSR) & u.LSR_DR
    assert r.rd(u.RBR) == ord("a")
    assert r.irq.level                         # 'b' moved from the backlog into the RBR
    assert r.rd(u.RBR) == ord("b")
    assert not r.irq.level
    assert not r.rd(u.LSR) & u.LSR_DR
    assert r.rd(u.RBR) == ord("b")             # RBR keeps its last byte


def test_rx_fifo_trigger_levels() -> None:
    for bits, level in zip((0x00, 0x40, 0x80, 0xC0), (1, 4, 8, 14), strict=True):
        r = Rig()
        r.wr(u.MCR, u.MCR_OUT2)
        r.wr(u.FCR, u.FCR_FIFO_ENABLE | bits)
        r.wr(u.IER, u.IER_ERBFI)
        if level > 1:
            r.dev.feed(bytes(level - 1))
            # Below the trigger: the (simplified) character-timeout indication still fires.
            assert r.rd(u.IIR) == u.IIR_FIFOS_ENABLED | u.IIR_CTI
            assert r.irq.level
        r.dev.feed(b"\x01")
        assert r.rd(u.IIR) == u.IIR_FIFOS_ENABLED | u.IIR_RDA, level
        for _ in range(level):
            r.rd(u.RBR)
        assert r.rd(u.IIR) == u.IIR_FIFOS_ENABLED | u.IIR_NO_INT
        assert not r.irq.level


def test_fifo_reset_and_backlog_refill() -> None:
    r = Rig()
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)
    data = bytes(range(40))
    assert r.dev.feed(data) == 40
    got = bytearray()
    while r.rd(u.LSR) & u.LSR_DR:
        got.append(r.rd(u.RBR))
    assert bytes(got) == data                  # nothing lost beyond the 16-byte FIFO
    # FCR receiver reset empties the FIFO (here filled by loopback, so no backlog refills it).
    r.wr(u.MCR, u.MCR_LOOP)
    for b in b"xyz":
        r.wr(u.THR, b)
    assert r.rd(u.LSR) & u.LSR_DR
    r.wr(u.FCR, u.FCR_FIFO_ENABLE | u.FCR_RCVR_RESET)
    assert not r.rd(u.LSR) & u.LSR_DR


def test_feed_is_bounded() -> None:
    r = Rig(rx_backlog=8)
    assert r.dev.rx_room() == 8
    assert r.dev.feed(b"0123456789") == 8
    assert r.dev.rx_room() == 1                # one byte already moved into the RBR
    assert r.dev.feed(b"xyz") == 1
    assert r.dev.rx_room() == 0
    assert r.dev.feed(b"!") == 0


def test_feed_from_another_thread() -> None:
    r = Rig(rx_backlog=64)
    r.wr(u.FCR, u.FCR_FIFO_ENABLE | 0xC0)
    r.wr(u.MCR, u.MCR_OUT2)
    r.wr(u.IER, u.IER_ERBFI)
    data = bytes(i * 7 % 251 for i in range(20000))
    done = threading.Event()

    def console() -> None:
        rest = memoryview(data)
        while rest:
            n = r.dev.feed(bytes(rest[:1000]))
            rest = rest[n:]
            if not n:
                threading.Event().wait(0.0005)
        done.set()

    t = threading.Thread(target=console)
    t.start()
    got = bytearray()
    while len(got) < len(data):
        if r.rd(u.LSR) & u.LSR_DR:
            got.append(r.rd(u.RBR))
    t.join(10)
    assert done.is_set()
    assert bytes(got) == data


def test_loopback_routes_tx_to_rx_and_mcr_to_msr() -> None:
    r = Rig()
    r.dev.feed(b"host")                        # 'h' goes into the RBR
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)             # enabling the FIFOs clears them: 'h' is gone
    assert r.rd(u.RBR) == ord("o")
    r.wr(u.MCR, u.MCR_LOOP)
    r.dev.feed(b"later")                       # waits in the backlog while looped
    assert r.rd(u.MSR) & 0xF0 == 0
    r.wr(u.THR, 0x41)
    assert r.sent == b""
    assert r.rd(u.RBR) == ord("s")             # the FIFO still held host input
    assert r.rd(u.RBR) == ord("t")
    assert r.rd(u.RBR) == 0x41
    assert not r.rd(u.LSR) & u.LSR_DR
    for bits, msr in ((u.MCR_RTS, u.MSR_CTS), (u.MCR_DTR, u.MSR_DSR),
                      (u.MCR_OUT1, u.MSR_RI), (u.MCR_OUT2, u.MSR_DCD)):
        r.wr(u.MCR, u.MCR_LOOP | bits)
        assert r.rd(u.MSR) & 0xF0 == msr
    r.wr(u.MCR, 0)
    assert r.rd(u.MSR) & 0xF0 == u.MODEM_INPUTS
    r.wr(u.THR, 0x42)
    assert r.sent == b"B"
    got = bytearray()
    while r.rd(u.LSR) & u.LSR_DR:
        got.append(r.rd(u.RBR))
    assert got == b"later"


def test_loopback_overrun_and_line_status_interrupt() -> None:
    r = Rig()
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)
    r.wr(u.MCR, u.MCR_LOOP | u.MCR_OUT2)
    r.wr(u.IER, u.IER_ELSI | u.IER_ERBFI)
    for i in range(17):
        r.wr(u.THR, i)
    assert r.irq.level
    assert r.rd(u.IIR) == u.IIR_FIFOS_ENABLED | u.IIR_RLS   # line status outranks data
    assert r.rd(u.LSR) == u.LSR_OE | u.LSR_DR | u.LSR_THRE | u.LSR_TEMT
    assert r.rd(u.LSR) & u.LSR_OE == 0         # reading LSR clears the error
    assert r.rd(u.IIR) == u.IIR_FIFOS_ENABLED | u.IIR_RDA
    assert [r.rd(u.RBR) for _ in range(16)] == list(range(16))  # the 17th was lost


def test_modem_status_deltas_and_interrupt() -> None:
    r = Rig()
    r.wr(u.MCR, u.MCR_OUT2)
    r.rd(u.MSR)
    r.wr(u.IER, u.IER_EDSSI)
    assert not r.irq.level
    r.wr(u.MCR, u.MCR_LOOP | u.MCR_OUT2 | u.MCR_OUT1)
    # Into loopback: CTS and DSR drop (deltas), DCD stays (OUT2), RI rises (no TERI yet).
    assert r.irq.level
    assert r.rd(u.IIR) == u.IIR_MS
    assert r.rd(u.MSR) == u.MSR_DCTS | u.MSR_DDSR | u.MSR_RI | u.MSR_DCD
    assert not r.irq.level                     # reading MSR clears the deltas
    r.wr(u.MCR, u.MCR_LOOP | u.MCR_OUT2)       # RI falls: trailing-edge ring indicator
    assert r.rd(u.MSR) == u.MSR_TERI | u.MSR_DCD


def test_iir_priority_order() -> None:
    r = Rig()
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)
    r.wr(u.MCR, u.MCR_LOOP | u.MCR_OUT2 | u.MCR_RTS)
    r.wr(u.IER, 0x0F)
    for i in range(17):
        r.wr(u.THR, i)                         # data + overrun + THRE, MSR deltas pending
    order = []
    iid = r.rd(u.IIR) & 0x0F
    while iid != u.IIR_NO_INT:
        order.append(iid)
        if iid == u.IIR_RLS:
            r.rd(u.LSR)
        elif iid in (u.IIR_RDA, u.IIR_CTI):
            while r.rd(u.LSR) & u.LSR_DR:
                r.rd(u.RBR)
        elif iid == u.IIR_MS:
            r.rd(u.MSR)
        iid = r.rd(u.IIR) & 0x0F
    assert order == [u.IIR_RLS, u.IIR_RDA, u.IIR_THRE, u.IIR_MS]
    assert not r.irq.level


def test_wide_accesses_split_into_bytes() -> None:
    r = Rig()
    r.dev.write(u.LCR, 2, 0x0B03)              # LCR=0x03, MCR=0x0B
    assert r.rd(u.LCR) == 0x03 and r.rd(u.MCR) == 0x0B
    assert r.dev.read(u.LCR, 2) == 0x0B03
    assert r.dev.read(6, 4) >> 16 == 0xFFFF     # past the eight ports: all ones


_ops = st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.sampled_from([1, 1, 1, 2, 4]),
                          st.integers(0, 0xFFFF_FFFF)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops=_ops, feed=st.binary(max_size=40))
def test_random_accesses_keep_invariants(ops, feed) -> None:
    r = Rig(rx_backlog=32)
    r.dev.feed(feed)
    for is_write, offset, size, value in ops:
        if is_write:
            r.dev.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= r.dev.read(offset, size) < 1 << (8 * size)
        lcr = r.rd(u.LCR)
        mcr = r.rd(u.MCR)
        assert mcr & ~u.MCR_MASK == 0
        if not lcr & u.LCR_DLAB:
            assert r.rd(u.IER) & 0xF0 == 0
        level = r.irq.level
        iir = r.rd(u.IIR)
        assert iir & 0x30 == 0 and iir & 0xC0 in (0, 0xC0)
        assert iir & 0x0F in (u.IIR_NO_INT, u.IIR_RLS, u.IIR_RDA, u.IIR_CTI, u.IIR_THRE,
                              u.IIR_MS)
        assert level == (not iir & u.IIR_NO_INT and bool(mcr & u.MCR_OUT2))
        lsr = r.rd(u.LSR)
        assert lsr & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT
        assert r.dev.rx_room() >= 0


def test_break_is_a_nul_with_lsr_bi() -> None:
    from vmrun.core.irq import RecordingIrqLine
    from vmrun.devices.uart import Uart16550

    irq = RecordingIrqLine()
    u = Uart16550(irq, lambda b: None)
    u.write(4, 1, 0x08)          # MCR.OUT2: the IRQ reaches the PIC
    u.write(1, 1, 0x05)          # IER: received data + line status
    u.send_break()
    assert irq.level
    assert u.read(5, 1) & 0x11 == 0x11     # LSR: BI and DR
    assert u.read(0, 1) == 0
    assert not u.read(5, 1) & 0x10         # BI clears when LSR is read


def test_rx_room_hook_after_a_refusal_once_half_drained() -> None:
    r = Rig(rx_backlog=8)
    calls = []
    r.dev.on_rx_room = lambda: calls.append(r.dev._lock.locked())
    assert r.dev.feed(b"0123") == 4            # all taken: nothing to report later
    assert r.rd(u.RBR) == ord("0")
    assert calls == []
    assert r.dev.feed(b"456789abcd") == 6      # refused: room is reported once half drained
    got = bytearray()
    while len(r.dev._backlog) > 5:
        got.append(r.rd(u.RBR))
        assert calls == []
    got.append(r.rd(u.RBR))                    # the backlog drops to half: one report...
    assert calls == [False]                    # ...made without the lock held
    while r.rd(u.LSR) & u.LSR_DR:
        got.append(r.rd(u.RBR))
    assert bytes(got) == b"123456789" and calls == [False]   # not once per byte


def test_rx_room_hook_from_fifo_enable_and_loopback_exit() -> None:
    r = Rig(rx_backlog=8)
    calls = []
    r.dev.on_rx_room = lambda: calls.append(1)
    assert r.dev.feed(bytes(20)) == 8          # one byte into the RBR, 7 waiting
    r.wr(u.FCR, u.FCR_FIFO_ENABLE)             # the FIFO takes the backlog
    assert calls == [1]
    r.wr(u.MCR, u.MCR_LOOP)
    r.wr(u.FCR, u.FCR_FIFO_ENABLE | u.FCR_RCVR_RESET)
    assert r.dev.feed(bytes(20)) == 8          # looped: everything waits in the backlog
    assert calls == [1]
    r.wr(u.MCR, 0)                             # back from loopback: the FIFO refills
    assert calls == [1, 1]
