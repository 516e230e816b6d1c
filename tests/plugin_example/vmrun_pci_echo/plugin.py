"""pci-echo: a scratch register, a DMA copy engine behind a doorbell, one MSI-X vector.

BAR 0, 32-bit registers (SRC and DST are 64-bit, low half first):
0x00 ID r "echo" | 0x04 SCRATCH rw | 0x08 SRC rw | 0x10 DST rw | 0x18 LEN rw (<= max_len)
0x1C STATUS r/write-1-to-clear: 1 DONE, 2 ERROR | 0x20 COUNT r: copies since reset
0x24 TOTAL r: copies since `vmrun up` began (kept across reboots) | 0x28 DOORBELL w: copy
LEN bytes from SRC to DST, set DONE, raise vector 0.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any

from vmrun.api import (
    BAR_MEM32,
    BarSpec,
    DeviceContext,
    DeviceType,
    GuestError,
    Option,
    PciDevice,
    hookimpl,
)

log = logging.getLogger("vmrun.pci-echo")
ID, SCRATCH, SRC, DST, LEN, STATUS, COUNT, TOTAL, DOORBELL = (
    0x00, 0x04, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x24, 0x28)
MAGIC = int.from_bytes(b"echo", "little")
DONE, ERROR = 1, 2


class EchoStats:
    """Host side: one per device id for the whole ``vmrun up``, across guest reboots."""

    copies = 0


class PciEcho(PciDevice):
    vendor_id, device_id, class_code = 0x1234, 0xEC40, 0xFF0000   # class FF: unassigned
    name = "pci-echo"
    bars = [BarSpec(0, 0x1000, BAR_MEM32)]
    msix_vectors, msix_bar = 1, 1   # the core builds self.irq: capability, table+PBA in BAR 1
    interrupt_pin = 1               # INTA# when the driver enables no MSI-X

    def __init__(self, max_len: int = 4096, scratch: int = 0,
                 stats: EchoStats | None = None) -> None:
        self.max_len, self.scratch = max_len, scratch
        self.stats = stats or EchoStats()
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.regs = bytearray(STATUS)             # ID..LEN: the plain registers
        struct.pack_into("<II", self.regs, ID, MAGIC, self.scratch)
        self.status = self.count = 0
        self.broken = False

    def realize(self) -> None:
        # With KVM this is an ioeventfd: the vCPU goes straight back into the guest and ring()
        # runs on the event loop. Without KVM (tests) the write comes to bar_write instead.
        self.add_doorbell(0, DOORBELL, 4, self.ring)

    # -- vCPU threads: keep it cheap, and nothing the guest does may raise out of here -----
    def bar_read(self, index: int, offset: int, size: int) -> int:
        live = struct.pack("<III", self.status, self.count, self.stats.copies & 0xFFFFFFFF)
        raw = (self.regs + live)[offset:offset + size]
        return int.from_bytes(raw.ljust(size, b"\0"), "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        value &= (1 << 8 * size) - 1
        if offset == DOORBELL:          # the device's work never runs on the vCPU
            self.loop.call_soon(self.ring, owner=self)
        elif offset == STATUS:          # write 1 to clear; acknowledges INTx too
            with self.lock:
                self.status &= ~value
            self.irq.deassert()
        elif SCRATCH <= offset and offset + size <= STATUS:
            self.regs[offset:offset + size] = value.to_bytes(size, "little")

    # -- the event loop --------------------------------------------------------------------
    def ring(self) -> None:
        """Copy LEN bytes from SRC to DST, then raise vector 0. A GuestError (an address
        outside guest RAM, a length over max_len) goes to the loop's guard: fault()."""
        if self.broken:
            return
        if not self.dma.enabled:        # bus mastering off: no DMA, and no MSI-X (a write)
            with self.lock:
                self.status |= ERROR
            return
        src, dst, n = struct.unpack_from("<QQI", self.regs, SRC)
        if n > self.max_len:
            raise GuestError(f"LEN {n} is over max_len {self.max_len}")
        src_sg, dst_sg = self.dma.sg([(src, n)]), self.dma.sg([(dst, n)])  # both checked
        dst_sg.writer().write(src_sg.reader().read(n))
        with self.lock:
            self.status |= DONE
            self.count += 1
        self.stats.copies += 1
        self.irq.trigger(0)             # MSI-X, else INTA#: whatever the driver enabled

    def fault(self, reason: str) -> None:
        """The guard caught an exception from ring(): stop copying until reset, say so once."""
        log.error("%s: %s: stopped until reset", self.name, reason)
        with self.lock:
            self.status |= ERROR
            self.broken = True


def _factory(ctx: DeviceContext, opts: dict[str, Any]) -> PciEcho:
    stats = ctx.host_resource("stats", EchoStats)      # the same object on every boot
    return PciEcho(max_len=opts["max_len"], scratch=opts["scratch"], stats=stats)


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType(
        "pci-echo", "PCI test device: scratch register, DMA copy, MSI-X", _factory,
        [Option("max_len", "size", "largest copy one doorbell may ask for", 64 * 1024, min=1),
         Option("scratch", "int", "power-on value of the scratch register", 0, min=0,
                max=0xFFFFFFFF)]))
