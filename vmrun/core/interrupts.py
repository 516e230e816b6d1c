"""A PCI function's interrupt source group: N vectors over MSI-X, MSI or INTx.

A device declares how many vectors it wants (``PciDevice.msix_vectors``, and/or
``msi_vectors`` for plain MSI); the core builds an :class:`InterruptSource` for it when it is
placed: the MSI-X capability with its table and PBA in a BAR of their own (``msix_bar``),
which the core maps and serves — the device never sees those accesses — the MSI capability,
the GSI routes and irqfds, masking, pending bits, reset and close. The device only calls
:meth:`InterruptSource.trigger` with a vector number; delivery follows what the driver
enabled, as Cloud Hypervisor's interrupt source groups do:

- MSI-X enabled: the vector's own message (masked: its pending bit);
- else MSI enabled: the vector (folded onto 0 when the driver allocated fewer);
- else INTx: INTA# goes high; the device lowers it with :meth:`deassert` when the driver
  acknowledges (reads its interrupt status register).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmrun.core.msi import MsiCapability
from vmrun.core.msix import MsixVectors

if TYPE_CHECKING:
    from vmrun.core.pci import PciDevice

MODE_INTX = "intx"
MODE_MSI = "msi"
MODE_MSIX = "msix"
NO_VECTOR = 0xFFFF


def msix_layout(nvectors: int) -> tuple[int, int]:
    """(PBA offset, BAR size) for a table of ``nvectors`` at offset 0 of its own BAR."""
    table = 16 * nvectors
    pba_offset = max(0x800, -(-table // 0x800) * 0x800)
    size = 0x1000
    while size < pba_offset + ((nvectors + 63) // 64) * 8:
        size *= 2
    return pba_offset, size


class MsixWindow:
    """The bus device for the MSI-X BAR: table, then PBA."""

    __slots__ = ("msix",)

    def __init__(self, msix: MsixVectors) -> None:
        self.msix = msix

    def read(self, offset: int, size: int) -> int:
        m = self.msix
        if offset >= m.pba_offset:
            return m.pba_read(offset - m.pba_offset, size)
        return m.table_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < self.msix.pba_offset:
            self.msix.table_write(offset, size, value)


class InterruptSource:
    """What the core gives a device as ``dev.irq``."""

    def __init__(self, dev: PciDevice, msix_vectors: int = 0, msix_bar: int | None = None,
                 msi_vectors: int = 0) -> None:
        self.dev = dev
        self.msix: MsixVectors | None = None
        self.msi: MsiCapability | None = None
        self.msix_bar = msix_bar
        self.bar_size = 0
        if msix_vectors:
            if msix_bar is None:
                raise ValueError(f"{dev.name}: MSI-X vectors need a BAR (msix_bar)")
            pba, self.bar_size = msix_layout(msix_vectors)
            self.msix = MsixVectors(msix_vectors, msix_bar, 0, msix_bar, pba)
        if msi_vectors:
            self.msi = MsiCapability(msi_vectors)
        self.nvectors = max(msix_vectors, msi_vectors, 1)

    # -- placement (the core) ----------------------------------------------------------------
    def add_capabilities(self) -> None:
        cfg = self.dev.config
        if self.msix is not None:
            self.msix.vm = self.dev.vm
            self.msix.add_capability(cfg)
        if self.msi is not None:
            self.msi.vm = self.dev.vm
            self.msi.add_capability(cfg)

    def realize(self) -> None:
        for part in (self.msix, self.msi):
            if part is not None:
                part.realize()

    def window(self) -> MsixWindow | None:
        return MsixWindow(self.msix) if self.msix is not None else None

    def config_changed(self, offset: int, size: int) -> None:
        """After a guest write to generic config space: follow the capabilities."""
        m = self.msix
        if m is not None and offset <= m.cap_offset + 3 and offset + size > m.cap_offset + 2:
            m.control_changed()
        if self.msi is not None and self.msi.overlaps(offset, size):
            self.msi.config_changed()

    def reset(self) -> None:
        if self.msix is not None:
            self.msix.reset()
            if self.msix.config is not None:   # enable and function mask off
                off = self.msix.cap_offset + 2
                ctrl = int.from_bytes(self.msix.config.data[off:off + 2], "little")
                self.msix.config.data[off:off + 2] = (ctrl & 0x07FF).to_bytes(2, "little")
        if self.msi is not None:
            self.msi.reset()
        self.dev.set_intx(False)

    def close(self) -> None:
        for part in (self.msix, self.msi):
            if part is not None:
                part.close()

    # -- snapshots -------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The MSI-X table and pending bits (MSI lives in config space, saved with it)."""
        m = self.msix
        if m is None:
            return {}
        with m.lock:
            return {"msix_table": m.table.hex(), "msix_pending": list(m.pending)}

    def load_state(self, state: dict) -> None:
        """Table and pending bits back, then every route KVM needs for them (config space,
        restored first, says whether MSI or MSI-X is on)."""
        m = self.msix
        if m is not None and "msix_table" in state:
            table = bytes.fromhex(state["msix_table"])
            if len(table) != len(m.table) or len(state["msix_pending"]) != m.n:
                raise ValueError(f"{self.dev.name}: MSI-X table of another size")
            with m.lock:
                m.table[:] = table
                m.pending = [bool(p) for p in state["msix_pending"]]
                for v in range(m.n):
                    addr, data, _ctrl = m.entry(v)
                    m.routes.route(v, addr, data)
        if self.msi is not None:
            self.msi.config_changed()

    # -- the device's side -------------------------------------------------------------------
    @property
    def mode(self) -> str:
        if self.msix is not None and self.msix.enabled:
            return MODE_MSIX
        if self.msi is not None and self.msi.enabled:
            return MODE_MSI
        return MODE_INTX

    def trigger(self, vector: int = 0) -> None:
        """Raise ``vector`` the way the driver set the function up (any thread). An MSI or
        MSI-X message is a memory write by the device: with bus mastering off it is not
        sent (INTx still is)."""
        m = self.msix
        if (m is not None and m.enabled or self.msi is not None and self.msi.enabled) and \
                not self.dev.config.data[4] & 0x4:
            return
        if m is not None and m.enabled:
            if vector != NO_VECTOR:
                m.notify(vector)
            return
        msi = self.msi
        if msi is not None and msi.enabled:
            msi.notify(vector if vector < msi.vectors_enabled else 0)
            return
        self.dev.set_intx(True)

    def deassert(self) -> None:
        """INTx: the driver acknowledged; lower INTA#."""
        self.dev.set_intx(False)

    def fired(self) -> list[int]:
        """Vectors delivered without KVM (tests)."""
        out: list[int] = []
        for part in (self.msix, self.msi):
            if part is not None:
                out += part.fired
        return out
