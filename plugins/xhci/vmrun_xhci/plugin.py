"""Registers ``xhci``: a USB 3 host controller with HID devices on its USB 2 ports."""

from __future__ import annotations

from typing import Any

from vmrun.api import DeviceContext, DeviceType, Option, hookimpl
from vmrun_xhci.controller import IDS, USB2_PORTS, XhciController
from vmrun_xhci.hid import DEVICES


def _factory(ctx: DeviceContext, opts: dict[str, Any]) -> XhciController:
    devices = [DEVICES[name]() for name in opts["devices"]]
    return XhciController(devices, context_size=int(opts["context_size"]),
                          scratchpads=opts["scratchpads"], pci_ids=opts["pci_ids"],
                          input_hub=ctx.input)


OPTIONS = [
    Option("devices", "list", "USB devices, one per USB 2 port from port 1", ["tablet"],
           choices=tuple(DEVICES), max=USB2_PORTS),
    Option("context_size", "choice", "device context size in bytes (HCCPARAMS1.CSZ)", "32",
           choices=("32", "64")),
    Option("scratchpads", "int", "scratchpad buffers the driver must give the controller", 0,
           min=0, max=1023),
    Option("pci_ids", "choice", "PCI identity: QEMU's qemu-xhci (1b36:000d) or the NEC "
           "uPD720200 (1033:0194)", "qemu", choices=tuple(IDS)),
]


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType("xhci", "xHCI USB controller with a HID tablet and keyboard",
                        _factory, OPTIONS))
