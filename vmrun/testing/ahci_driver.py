"""A mock AHCI driver for tests: what an OS's ``ahci`` driver does, on a :class:`FakeVm`.

It finds the controller's ABAR (BAR 5), resets the HBA, lays out each port's command list,
FIS receive area and command tables in guest memory, builds H2D register FISes, ATAPI CDBs
and PRDTs, issues commands (one at a time or several NCQ tags at once) and waits for them the
way Linux does: PxCI for non-queued commands, PxSACT for queued ones, PxIS for errors.
Everything it writes is plain guest memory, so a test can also scribble over any of it.

::

    drv = AhciDriver(vm, slot=4)
    drv.reset()
    drv.start(0)
    ident = drv.identify(0)
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from vmrun.testing.pcidriver import PciDriver

# registers (AHCI 1.3)
CAP, GHC, IS, PI, VS, CAP2 = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x24
P_CLB, P_CLBU, P_FB, P_FBU, P_IS, P_IE, P_CMD, P_TFD, P_SIG, P_SSTS, P_SCTL, P_SERR, \
    P_SACT, P_CI = (0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x20, 0x24, 0x28, 0x2C, 0x30,
                    0x34, 0x38)
GHC_HR, GHC_IE, GHC_AE = 1, 2, 1 << 31
CMD_ST, CMD_FRE, CMD_CLO, CMD_FR, CMD_CR = 1, 1 << 4, 1 << 3, 1 << 14, 1 << 15
IS_DHRS, IS_PSS, IS_SDBS = 1, 2, 8
IS_ERRORS = (1 << 24) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 30)
IS_TFES, IS_HBFS, IS_IFS, IS_OFS = 1 << 30, 1 << 29, 1 << 27, 1 << 24
RX_PSFIS, RX_RFIS, RX_SDBFIS = 0x20, 0x40, 0x58

# memory layout: per port 64 KiB at MEM_BASE + 64 KiB * port
MEM_BASE = 0x100000
PORT_AREA = 0x10000
TABLE_SIZE = 0x400              # a command table: FIS, CDB, then up to 56 PRDT entries
DATA_BASE = 0x800000


@dataclass
class Result:
    """How a command ended: the PxIS bits it raised, PxTFD, and the FIS the HBA posted."""

    is_: int
    tfd: int
    ok: bool

    @property
    def status(self) -> int:
        return self.tfd & 0xFF

    @property
    def error(self) -> int:
        return self.tfd >> 8 & 0xFF


def h2d(command: int, lba: int = 0, count: int = 0, features: int = 0,
        device: int = 0x40, control: int = 0, c: bool = True) -> bytes:
    """A Register Host to Device FIS."""
    fis = bytearray(20)
    fis[0], fis[1], fis[2], fis[3] = 0x27, 0x80 if c else 0, command, features & 0xFF
    fis[4:7] = (lba & 0xFFFFFF).to_bytes(3, "little")
    fis[7] = device
    fis[8:11] = (lba >> 24 & 0xFFFFFF).to_bytes(3, "little")
    fis[11] = features >> 8 & 0xFF
    struct.pack_into("<H", fis, 12, count & 0xFFFF)
    fis[15] = control
    return bytes(fis)


class AhciDriver:
    def __init__(self, vm, slot: int, func: int = 0) -> None:
        self.vm = vm
        self.pci = PciDriver(vm)
        self.slot, self.func = slot, func
        self.abar = self.pci.bar_address(slot, func, 5)
        self._next_data = DATA_BASE

    # -- registers ----------------------------------------------------------------------------
    def reg(self, off: int) -> int:
        return self.vm.mmio.read(self.abar + off, 4)

    def set(self, off: int, value: int) -> None:
        self.vm.mmio.write(self.abar + off, 4, value)

    def preg(self, port: int, off: int) -> int:
        return self.reg(0x100 + 0x80 * port + off)

    def pset(self, port: int, off: int, value: int) -> None:
        self.set(0x100 + 0x80 * port + off, value)

    # -- memory -------------------------------------------------------------------------------
    def clb(self, port: int) -> int:
        return MEM_BASE + PORT_AREA * port

    def fb(self, port: int) -> int:
        return self.clb(port) + 0x400

    def table(self, port: int, slot: int) -> int:
        return self.clb(port) + 0x800 + TABLE_SIZE * slot

    def alloc(self, n: int, align: int = 4096) -> int:
        addr = (self._next_data + align - 1) & ~(align - 1)
        self._next_data = addr + n
        return addr

    def fis(self, port: int, offset: int, n: int) -> bytes:
        return self.vm.memory.read(self.fb(port) + offset, n)

    # -- bring-up --------------------------------------------------------------------------------
    def reset(self) -> None:
        self.set(GHC, GHC_AE | GHC_HR)
        assert not self.reg(GHC) & GHC_HR, "GHC.HR did not clear"
        self.set(GHC, GHC_AE | GHC_IE)

    def start(self, port: int, irq_mask: int = 0xFDC000FF) -> None:
        """As Linux's ahci_start_port: stop, lay out memory, FIS receive on, then ST."""
        self.stop(port)
        clb, fb = self.clb(port), self.fb(port)
        self.vm.memory.write(clb, bytes(PORT_AREA))
        self.pset(port, P_CLB, clb & 0xFFFFFFFF)
        self.pset(port, P_CLBU, clb >> 32)
        self.pset(port, P_FB, fb & 0xFFFFFFFF)
        self.pset(port, P_FBU, fb >> 32)
        self.pset(port, P_SERR, 0xFFFFFFFF)
        self.pset(port, P_IS, 0xFFFFFFFF)
        self.pset(port, P_CMD, self.preg(port, P_CMD) | CMD_FRE)
        self.pset(port, P_CMD, self.preg(port, P_CMD) | CMD_ST)
        self.pset(port, P_IE, irq_mask)

    def stop(self, port: int) -> None:
        self.pset(port, P_CMD, self.preg(port, P_CMD) & ~CMD_ST)
        assert not self.preg(port, P_CMD) & CMD_CR, "PxCMD.CR did not clear"

    def restart(self, port: int) -> None:
        """After an error, as libata's EH: stop, clear errors, start again."""
        self.stop(port)
        self.pset(port, P_SERR, 0xFFFFFFFF)
        self.pset(port, P_IS, 0xFFFFFFFF)
        self.set(IS, 1 << port)
        self.pset(port, P_CMD, self.preg(port, P_CMD) | CMD_ST)

    def comreset(self, port: int) -> None:
        self.stop(port)
        self.pset(port, P_SCTL, 0x301)
        self.pset(port, P_SCTL, 0x300)

    # -- commands -----------------------------------------------------------------------------
    def build(self, port: int, slot: int, fis: bytes, prdt: list[tuple[int, int]] = (),
              *, write: bool = False, cdb: bytes = b"", cfl: int | None = None,
              prdtl: int | None = None, ctba: int | None = None) -> None:
        """Write the command header and table of ``slot``: the FIS, the CDB (ATAPI when
        given) and the PRDT; ``cfl``, ``prdtl`` and ``ctba`` override what a driver would
        put there (hostile tests)."""
        mem = self.vm.memory
        table = self.table(port, slot) if ctba is None else ctba
        flags = (cfl if cfl is not None else len(fis) // 4) & 0x1F
        if write:
            flags |= 1 << 6
        if cdb:
            flags |= 1 << 5
        n = len(prdt) if prdtl is None else prdtl
        mem.write(self.clb(port) + 32 * slot,
                  struct.pack("<IIII", flags | n << 16, 0, table & 0xFFFFFFFF, table >> 32))
        if ctba is None:
            mem.write(table, fis.ljust(64, b"\0") + cdb.ljust(16, b"\0"))
            entries = b"".join(struct.pack("<IIII", a & 0xFFFFFFFF, a >> 32, 0, n_ - 1)
                               for a, n_ in prdt)
            mem.write(table + 0x80, entries[:TABLE_SIZE - 0x80])

    def prdbc(self, port: int, slot: int) -> int:
        return struct.unpack("<I", self.vm.memory.read(self.clb(port) + 32 * slot + 4, 4))[0]

    def issue(self, port: int, slots: int, ncq: bool = False) -> None:
        if ncq:
            self.pset(port, P_SACT, slots)
        self.pset(port, P_CI, slots)

    def wait(self, port: int, slots: int, ncq: bool = False, timeout: float = 5.0) -> Result:
        """Until the slots are done (PxCI, or PxSACT for NCQ) or an error bit shows."""
        end = time.monotonic() + timeout
        while True:
            self.vm.sync()
            is_ = self.preg(port, P_IS)
            busy = self.preg(port, P_SACT if ncq else P_CI) & slots
            if not busy or is_ & IS_ERRORS:
                self.vm.sync()
                is_ = self.preg(port, P_IS)
                self.pset(port, P_IS, is_)
                return Result(is_, self.preg(port, P_TFD), not busy and not is_ & IS_ERRORS)
            if time.monotonic() > end:
                raise TimeoutError(f"port {port}: slots {slots:#x} still busy "
                                   f"(PxIS {is_:#x}, PxTFD {self.preg(port, P_TFD):#x})")
            time.sleep(0.0005)

    def run(self, port: int, fis: bytes, prdt: list[tuple[int, int]] = (), *,
            write: bool = False, cdb: bytes = b"", slot: int = 0) -> Result:
        self.build(port, slot, fis, prdt, write=write, cdb=cdb)
        self.issue(port, 1 << slot)
        return self.wait(port, 1 << slot)

    # -- conveniences -------------------------------------------------------------------------
    def identify(self, port: int, packet: bool = False) -> bytes:
        buf = self.alloc(512)
        r = self.run(port, h2d(0xA1 if packet else 0xEC), [(buf, 512)])
        assert r.ok, r
        return self.vm.memory.read(buf, 512)

    def read(self, port: int, lba: int, count: int, sector: int = 512,
             command: int = 0x25) -> tuple[Result, bytes]:
        buf = self.alloc(count * sector)
        r = self.run(port, h2d(command, lba, count), [(buf, count * sector)])
        return r, self.vm.memory.read(buf, count * sector)

    def write(self, port: int, lba: int, data: bytes, sector: int = 512,
              command: int = 0x35) -> Result:
        buf = self.alloc(len(data))
        self.vm.memory.write(buf, data)
        return self.run(port, h2d(command, lba, len(data) // sector), [(buf, len(data))],
                        write=True)

    def ncq(self, port: int, tag: int, lba: int, count: int, buf: int, sector: int = 512,
            write: bool = False) -> None:
        """Build READ/WRITE FPDMA QUEUED in slot ``tag`` (issue it with :meth:`issue`)."""
        fis = h2d(0x61 if write else 0x60, lba, tag << 3, features=count)
        self.build(port, tag, fis, [(buf, count * sector)], write=write)

    def packet(self, port: int, cdb: bytes, length: int = 0, dma: bool = False,
               slot: int = 0) -> tuple[Result, bytes]:
        """An ATAPI PACKET command with ``length`` bytes of data in."""
        buf = self.alloc(max(length, 1))
        self.vm.memory.write(buf, bytes(max(length, 1)))
        fis = h2d(0xA0, lba=(min(length, 0xFFFE) << 8), features=1 if dma else 0)
        r = self.run(port, fis, [(buf, length)] if length else [], cdb=cdb.ljust(12, b"\0"),
                     slot=slot)
        return r, self.vm.memory.read(buf, length)


__all__ = ["AhciDriver", "Result", "h2d"]
