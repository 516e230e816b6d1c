"""Everything a device plugin needs, importable from one place.

::

    from vmrun.api import PciDevice, BarSpec, DeviceType, Option, hookimpl

A plugin imports only this module (``plugins/virtio_blk`` does); what is here is the plugin
contract and stays stable, what is not is vmrun's own business. See the README's "Writing a
device plugin" for a complete example.

- registering: :data:`hookimpl`, :class:`DeviceType`, :class:`Option`, :class:`DeviceContext`
  (what a factory gets: the machine's identity, the event loop, the input hub, host
  resources that outlive a reboot);
- PCI: :class:`PciDevice` (the contract), :class:`BarSpec` and the BAR kinds, INTx, MSI and
  MSI-X through ``msix_vectors``/``msi_vectors`` and ``self.irq.trigger(vector)``, doorbells
  (``add_doorbell``), ``self.dma`` for guest memory;
- guest memory: :class:`GuestDma`, :class:`SgList` with :class:`SgReader`/:class:`SgWriter`,
  and :class:`GuestError`, the one exception for "the guest handed us garbage";
- the event loop: :class:`EventLoop` (fds, timers, ``call_soon``);
- virtio: :class:`VirtioDevice`, :class:`VirtioPciTransport`, :class:`DescriptorChain`, the
  feature and status bits;
- block: :class:`BlockBackend`, :func:`open_disk`, :class:`BlockQueue`,
  :func:`parse_sectorsize`, and the options every disk emulation shares:
  :func:`disk_options` (declarations), :func:`check_disk` (checks while the machine file is
  read), :func:`open_disk_from` (open what they describe);
- input: :class:`InputHub` and :data:`ABS_MAX`;
- the control socket: :class:`QmpCommand`, :class:`QmpContext` and :class:`QmpError` for the
  ``vmrun_qmp_commands`` hook (commands such as ``screendump`` or ``eject``);
- snapshots: a device's ``device_state()``/``load_device_state()`` (a PciDevice) or
  ``save_state()``/``load_state()`` (a VirtioDevice), with :func:`save_fields`,
  :func:`load_fields`, :func:`plain_fields`, :func:`versioned`, :func:`check_version`,
  :class:`PlainState` and :class:`SnapshotUnsupported`;
- network: :class:`NetBackend` and :class:`LinkCallbacks` (the host side of a link), the
  offload caps, ``NET_OPTIONS`` with :func:`check_net_options` (every NIC's backend keys),
  :func:`open_net_backend` and :func:`nic_mac`;
- device RAM: ``BarSpec(..., ram=True)`` gives a :class:`RamBar` (host memory the guest maps
  as a KVM memory slot, with a dirty page log), :func:`dirty_log_works` says whether this
  host's KVM fills that log.
"""

from vmrun.block.backend import BlockBackend, parse_sectorsize
from vmrun.block.image_tools import open_disk
from vmrun.block.options import check_disk, disk_options, open_disk_from
from vmrun.block.queue import BlockQueue
from vmrun.core.devstate import (
    PlainState,
    SnapshotUnsupported,
    check_version,
    load_fields,
    plain_fields,
    save_fields,
    versioned,
)
from vmrun.core.dirty_log import dirty_log_works
from vmrun.core.dma import DmaDisabled, GuestDma, SgList, SgReader, SgWriter
from vmrun.core.eventloop import EventLoop, Source, Timer
from vmrun.core.input import ABS_MAX, InputHub
from vmrun.core.interrupts import InterruptSource
from vmrun.core.memory import GuestError
from vmrun.core.pci import (
    BAR_IO,
    BAR_MEM32,
    BAR_MEM64,
    CAP_ID_MSI,
    CAP_ID_MSIX,
    COMMAND,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    BarSpec,
    PciDevice,
    RamBar,
)
from vmrun.core.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from vmrun.core.virtio.pci import VirtioPciTransport
from vmrun.core.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from vmrun.errors import VmrunError
from vmrun.net.backend import (
    CAP_CSUM,
    CAP_TSO4,
    CAP_TSO6,
    CAP_UFO,
    CAP_VNET_HDR,
    VNET_HDR_LEN,
    LinkCallbacks,
    NetBackend,
)
from vmrun.net.options import (
    NET_OPTIONS,
    check_net_options,
    derive_mac,
    format_mac,
    nic_mac,
    open_net_backend,
)
from vmrun.plugins import hookimpl
from vmrun.plugins.registry import DeviceContext, DeviceType, Option, OptionError
from vmrun.qmp import QmpCommand, QmpContext, QmpError

__all__ = [
    "ABS_MAX", "BAR_IO", "CAP_CSUM", "CAP_TSO4", "CAP_TSO6", "CAP_UFO", "CAP_VNET_HDR",
    "LinkCallbacks", "NET_OPTIONS", "NetBackend", "VNET_HDR_LEN", "check_net_options",
    "derive_mac", "format_mac", "nic_mac", "open_net_backend", "BAR_MEM32", "BAR_MEM64",
    "CAP_ID_MSI", "CAP_ID_MSIX", "COMMAND",
    "COMMAND_MASTER", "COMMAND_MEMORY", "BarSpec", "BlockBackend", "BlockQueue",
    "DescriptorChain", "DeviceContext", "DeviceType", "DmaDisabled", "EventLoop",
    "GuestDma", "GuestError", "InputHub", "InterruptSource", "Option", "PciDevice",
    "PlainState", "QmpCommand", "QmpContext", "QmpError", "RamBar", "SnapshotUnsupported",
    "STATUS_DEVICE_NEEDS_RESET", "SgList", "SgReader", "SgWriter", "Source", "Timer",
    "VIRTIO_F_VERSION_1", "VirtioDevice", "VirtioPciTransport", "Virtqueue", "VirtqueueError",
    "VmrunError", "dirty_log_works", "hookimpl", "load_fields", "open_disk", "parse_sectorsize",
    "save_fields", "plain_fields", "versioned", "check_version", "check_disk", "disk_options",
    "open_disk_from", "OptionError",
]
