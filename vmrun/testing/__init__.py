"""Test helpers for vmrun and for authors of device plugins.

- :class:`FakeVm`: guest memory and buses without KVM; interrupts are recorded, eventfds real.
- :class:`PciDriver`: a config-space driver (mechanism #1 through the port bus) that finds a
  device, sizes and reads its BARs and capabilities, as an OS would.
- :class:`MockVirtqueue` / :class:`VirtioDriver`: a mock virtio driver that lays out descriptor
  tables and rings in the fake memory and drives a device through its modern PCI transport.
- :class:`AhciDriver`: a mock AHCI driver (command lists, FIS receive areas, PRDTs, NCQ and
  ATAPI commands) for SATA controllers.
- :class:`XhciDriver`: a mock xHCI driver (rings, contexts, event ring, enumeration, control
  and interrupt transfers) for any xHCI controller.

Use them as pytest fixtures in a plugin's tests::

    from vmrun.testing import FakeVm, VirtioDriver
"""

from vmrun.testing.ahci_driver import AhciDriver
from vmrun.testing.fakes import FakeVm, RecordingDevice
from vmrun.testing.pcidriver import PciDriver
from vmrun.testing.virtio import MockVirtqueue, VirtioDriver
from vmrun.testing.xhci_driver import XhciDriver

__all__ = ["AhciDriver", "FakeVm", "RecordingDevice", "PciDriver", "MockVirtqueue",
           "VirtioDriver", "XhciDriver"]
