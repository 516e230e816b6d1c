"""The PCI root bridge in the DSDT: identity, decoded windows, and INTx routing (_PRT); and
the ECAM window reserved as a motherboard resource.

Only slots that hold a device with an interrupt pin get _PRT entries: the guest's AML
interpreter walks every entry, and a short table is a fast one.
"""

from __future__ import annotations

from vmrun.core import aml, layout
from vmrun.core.pci import PciRoot, intx_gsi


def pci_root_aml(root: PciRoot) -> bytes:
    high_base = root.next_mem64_base
    prt = []
    slots = sorted({slot for (slot, _f), dev in root.devices.items() if dev.interrupt_pin})
    for slot in slots:
        for pin in range(4):
            prt.append(aml.package(aml.integer((slot << 16) | 0xFFFF), aml.integer(pin),
                                   aml.integer(0), aml.integer(intx_gsi(slot, pin + 1))))
    crs = aml.resource_template(
        aml.word_bus_number(0, 0xFF),
        aml.io(layout.PCI_CONFIG_ADDRESS, 8),
        aml.word_io(0x0000, 0x0CF7),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(0xA0000, 0xBFFFF),
        aml.dword_memory(layout.PCI_MMIO32_START, layout.ECAM_BASE - 1),
        aml.qword_memory(high_base, high_base + layout.HIGH_MMIO_SIZE - 1),
    )
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0A08"))),
        aml.name("_CID", aml.integer(aml.eisa_id("PNP0A03"))),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", crs),
        aml.name("_PRT", aml.package(*prt)),
    )


def ecam_allocation() -> tuple[int, int, int, int]:
    """The MCFG entry for our ECAM window: (base, segment, first bus, last bus). It must
    span the buses of PCI0's _CRS (0-255) and match the PNP0C02 reservation, or Linux says
    MMCONFIG "only partially covers this bridge"."""
    return layout.ECAM_BASE, 0, 0, (layout.ECAM_SIZE >> 20) - 1


def ecam_reservation_aml(base: int = layout.ECAM_BASE, size: int = layout.ECAM_SIZE) -> bytes:
    """A PNP0C02 "motherboard resources" device that claims the ECAM window.

    The PCI Firmware spec asks firmware to reserve the MCFG range this way; without it Linux
    says "MMCONFIG ... not reserved in ACPI motherboard resources" and, on some kernels,
    falls back to port-I/O configuration access.
    """
    return aml.device(
        "MRES",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0C02"))),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(aml.memory32_fixed(base, size))),
    )
