"""A 16550A UART (National Semiconductor PC16550D register set): the guest's serial console.

The device is a register state machine plus one interrupt line, in the manner of vm-superio's
serial device. Eight ports: RBR/THR/DLL (0), IER/DLM (1), IIR/FCR (2), LCR (3), MCR (4),
LSR (5), MSR (6), SCR (7); LCR.DLAB switches offsets 0 and 1 to the divisor latch.

Why it is shaped this way:

* Transmit is immediate. A byte written to THR goes to ``out`` at once (the console wants it
  now), so THR and the transmitter are always empty: LSR.THRE and LSR.TEMT always read 1 and
  the THR-empty interrupt re-arms after every write, as a very fast line would.
* Receive has two stages. ``feed`` (the console backend, on the event loop) appends to a bounded
  host-side backlog; bytes move from there into the 16-byte receiver FIFO (one byte, the RBR,
  when FIFOs are off) as the guest reads, so pasted text waits instead of overrunning.
  ``feed`` returns how much it accepted; the rest stays with the console backend, which stops
  reading its input until ``on_rx_room`` tells it the guest has drained the backlog to half
  (called once per refusal, not per byte, and never with the lock held).
* The receiver-timeout case is simplified: data below the FIFO trigger level gives the
  character-timeout indication (IIR 0x0C) at once instead of after four character times, so
  a guest is never left waiting for bytes that will not come.
* On a PC, MCR.OUT2 gates the UART's interrupt onto the ISA IRQ line; the pin modelled here is
  (interrupt pending AND OUT2).
* MCR.LOOP connects the transmitter to the receiver (nothing reaches ``out``) and the four
  modem-control outputs to the modem-status inputs; the host backlog waits meanwhile. The FIFO
  then overruns like the real part, which is what Linux's FIFO-size probe counts on.

Register state is guarded by one lock: the vCPU thread and the console backend (on the event
loop thread) both touch it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from vmrun.core.bus import ByteWideDevice
from vmrun.core.devstate import PlainState
from vmrun.core.irq import IrqLine

# Register offsets.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_ERBFI = 0x01      # received data available
IER_ETBEI = 0x02      # transmitter holding register empty
IER_ELSI = 0x04       # receiver line status
IER_EDSSI = 0x08      # modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_RLS = 0x06        # receiver line status (highest priority)
IIR_RDA = 0x04        # received data available (FIFO at or above its trigger level)
IIR_CTI = 0x0C        # character timeout (data below the trigger level)
IIR_THRE = 0x02       # THR empty
IIR_MS = 0x00         # modem status (lowest priority)
IIR_FIFOS_ENABLED = 0xC0

FCR_FIFO_ENABLE = 0x01
FCR_RCVR_RESET = 0x02
FCR_XMIT_RESET = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER = 0xC0
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

FIFO_SIZE = 16
RX_BACKLOG = 64 * 1024   # host input waiting beyond the FIFO (a large paste)
# What a console on the other end of the cable shows: clear to send, data set ready, carrier.
MODEM_INPUTS = MSR_CTS | MSR_DSR | MSR_DCD


class Uart16550(PlainState, ByteWideDevice):
    """One 16550A at an 8-port I/O range; ``irq`` is its IRQ pin.

    ``out2_gates_irq`` models the PC's ISA wiring (the default); a UART behind a PCI function
    drives INTx directly and can pass False.
    """

    def __init__(self, irq: IrqLine, out: Callable[[bytes], None],
                 rx_backlog: int = RX_BACKLOG, out2_gates_irq: bool = True) -> None:
        self._irq = irq
        self._out = out
        self._gate = MCR_OUT2 if out2_gates_irq else 0
        self._lock = threading.Lock()
        self._backlog: deque[int] = deque()   # fed by the host, not yet received
        self._backlog_max = rx_backlog
        self._backlog_low = rx_backlog // 2   # room is reported once the backlog drains to this
        self._rx_refused = False              # feed turned bytes away; tell on_rx_room later
        self._rx_room_due = False             # ...it has drained: report once the lock is free
        # Called (no lock held, from whichever thread drained the backlog: usually the vCPU)
        # once after ``feed`` refused bytes, when there is room again. Must not block.
        self.on_rx_room: Callable[[], object] | None = None
        self._fifo: deque[int] = deque()      # the receiver FIFO (capacity 1 when disabled)
        self._capacity = 1
        self._trigger = 1
        self._last_rx = 0                     # RBR keeps its last byte once the FIFO is empty
        self._ier = 0
        self._fcr = 0                         # FIFO enable, DMA mode and trigger bits
        self._lcr = 0
        self._mcr = 0
        self._lsr_errors = 0                  # OE/PE/FE/BI, cleared by reading LSR
        self._msr = MODEM_INPUTS              # inputs (bits 4-7) and deltas (bits 0-3)
        self._scr = 0
        self._dll = 0
        self._dlm = 0
        self._thre_pending = False            # THR-empty interrupt latched
        self._level = False

    # -- host side ---------------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Queue console input; returns how many bytes fit. When not all did, ``on_rx_room``
        is called once the guest has made room (retry then)."""
        with self._lock:
            n = max(min(len(data), self._backlog_max - len(self._backlog)), 0)
            if n > 0:
                self._backlog.extend(data[:n])
                self._refill()
                self._update_irq()
            if n < len(data):
                self._rx_refused = True
            due = self._rx_room_due
        if due:
            self._tell_rx_room()
        return n

    def send_break(self) -> None:
        """A BREAK on the line: a NUL character received with LSR.BI set (the console's
        C-a b; Linux turns it plus the next key into a SysRq)."""
        with self._lock:
            if len(self._fifo) >= self._capacity:
                self._fifo.pop()
                self._lsr_errors |= LSR_OE
            self._fifo.appendleft(0)
            self._lsr_errors |= LSR_BI
            self._update_irq()

    def rx_room(self) -> int:
        """How many more bytes ``feed`` would accept now."""
        with self._lock:
            return max(self._backlog_max - len(self._backlog), 0)

    def _tell_rx_room(self) -> None:
        with self._lock:
            due, self._rx_room_due = self._rx_room_due, False
        hook = self.on_rx_room
        if due and hook is not None:
            hook()

    # -- bus device ----------------------------------------------------------------------
    def _read_byte(self, offset: int) -> int:
        if offset == RBR:
            with self._lock:
                if self._lcr & LCR_DLAB:
                    return self._dll
                value = self._read_rbr()
                due = self._rx_room_due
            if due:
                self._tell_rx_room()
            return value
        with self._lock:
            if offset == IER:
                return self._dlm if self._lcr & LCR_DLAB else self._ier
            if offset == IIR:
                iid = self._interrupt_id()
                if iid == IIR_THRE:
                    # Reading IIR with THRE as the source clears that interrupt.
                    self._thre_pending = False
                    self._update_irq()
                return iid | (IIR_FIFOS_ENABLED if self._fcr & FCR_FIFO_ENABLE else 0)
            if offset == LCR:
                return self._lcr
            if offset == MCR:
                return self._mcr
            if offset == LSR:
                value = self._lsr_errors | LSR_THRE | LSR_TEMT | (LSR_DR if self._fifo else 0)
                if self._lsr_errors:
                    self._lsr_errors = 0
                    self._update_irq()
                return value
            if offset == MSR:
                value = self._msr
                if value & MSR_DELTAS:
                    self._msr = value & ~MSR_DELTAS
                    self._update_irq()
                return value
            if offset == SCR:
                return self._scr
            return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        sent = -1
        due = False
        with self._lock:
            if offset == THR:
                if self._lcr & LCR_DLAB:
                    self._dll = value
                    return
                if self._mcr & MCR_LOOP:
                    self._receive_looped(value)
                else:
                    sent = value
                # Writing THR clears the THR-empty interrupt; the byte leaves at once, so THR
                # is empty again and the interrupt re-arms.
                self._thre_pending = True
                self._update_irq()
            elif offset == IER:
                if self._lcr & LCR_DLAB:
                    self._dlm = value
                    return
                old = self._ier
                self._ier = value & IER_MASK
                if self._ier & IER_ETBEI and not old & IER_ETBEI:
                    self._thre_pending = True   # enabling ETBEI with THR empty interrupts
                self._update_irq()
            elif offset == FCR:
                self._write_fcr(value)
                due = self._rx_room_due
            elif offset == LCR:
                self._lcr = value
            elif offset == MCR:
                self._write_mcr(value & MCR_MASK)
                due = self._rx_room_due
            elif offset == SCR:
                self._scr = value
            # LSR and MSR writes are factory-test only: ignored.
        if sent >= 0:
            self._out(bytes((sent,)))
        if due:
            self._tell_rx_room()

    # -- receiver ------------------------------------------------------------------------
    def _read_rbr(self) -> int:
        fifo = self._fifo
        if fifo:
            self._last_rx = fifo.popleft()
            if self._backlog and not self._mcr & MCR_LOOP:
                self._refill()
            self._update_irq()
        return self._last_rx

    def _refill(self) -> None:
        """Move host input into the receiver (not in loopback: its input is the transmitter)."""
        if self._mcr & MCR_LOOP:
            return
        fifo, backlog, cap = self._fifo, self._backlog, self._capacity
        while backlog and len(fifo) < cap:
            fifo.append(backlog.popleft())
        if self._rx_refused and len(backlog) <= self._backlog_low:
            self._rx_refused = False
            self._rx_room_due = True

    def _receive_looped(self, value: int) -> None:
        if len(self._fifo) < self._capacity:
            self._fifo.append(value)
        else:
            # Overrun: with FIFOs the new character is lost; without, it replaces the RBR.
            self._lsr_errors |= LSR_OE
            if not self._fcr & FCR_FIFO_ENABLE:
                self._fifo[-1] = value

    def _write_fcr(self, value: int) -> None:
        enable = value & FCR_FIFO_ENABLE
        if enable != self._fcr & FCR_FIFO_ENABLE:
            self._fifo.clear()                  # switching FIFO mode empties both FIFOs
        if enable:
            if value & FCR_RCVR_RESET:
                self._fifo.clear()
            self._fcr = value & (FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_TRIGGER)
            self._capacity = FIFO_SIZE
            self._trigger = RX_TRIGGER_LEVELS[value >> 6]
        else:
            self._fcr = 0                       # other bits are only written with FCR0 = 1
            self._capacity = 1
            self._trigger = 1
        self._refill()
        self._update_irq()

    # -- modem control ---------------------------------------------------------------------
    def _write_mcr(self, value: int) -> None:
        self._mcr = value
        if value & MCR_LOOP:
            # Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
            inputs = (((value & MCR_RTS) << 3) | ((value & MCR_DTR) << 5)
                      | ((value & MCR_OUT1) << 4) | ((value & MCR_OUT2) << 4))
        else:
            inputs = MODEM_INPUTS
            self._refill()
        old = self._msr
        changed = (old ^ inputs) & 0xF0
        deltas = old & MSR_DELTAS
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_RI and not inputs & MSR_RI:
            deltas |= MSR_TERI               # trailing edge of ring indicator
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        self._msr = inputs | deltas
        self._update_irq()

    # -- interrupts ------------------------------------------------------------------------
    def _interrupt_id(self) -> int:
        """The highest-priority pending, enabled interrupt, as IIR bits 0-3."""
        ier = self._ier
        if ier & IER_ELSI and self._lsr_errors:
            return IIR_RLS
        if ier & IER_ERBFI and self._fifo:
            return IIR_RDA if len(self._fifo) >= self._trigger else IIR_CTI
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if ier & IER_EDSSI and self._msr & MSR_DELTAS:
            return IIR_MS
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INT and self._mcr & self._gate == self._gate
        if level != self._level:
            self._level = level
            self._irq.set_level(level)
