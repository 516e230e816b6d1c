"""vmrun's plugin hooks (pluggy project name and entry-point group: "vmrun").

A plugin is a module (or object) with functions marked ``@vmrun.plugins.hookimpl``; a separately
installed distribution announces it with an entry point::

    [project.entry-points.vmrun]
    virtio_blk = "vmrun_virtio_blk.plugin"

Built-in emulations (hostbridge, lpc, uart, virtio-rnd) register through exactly the same hooks.

The PCI device contract that a device factory returns is :class:`vmrun.core.pci.PciDevice`:

- identity: ``vendor_id``, ``device_id``, ``class_code``, ``revision``, ``subsystem_*``,
  ``interrupt_pin`` (1 = INTA#, routed through the IOAPIC and described by the DSDT's _PRT);
- ``bars``: :class:`vmrun.core.pci.BarSpec` list (I/O, 32- or 64-bit memory; power-of-two
  sizes). The core does BAR sizing, placement, decoding (command register) and moves;
- ``bar_read(index, offset, size)`` / ``bar_write(index, offset, size, value)``: register
  accesses inside a BAR, on a vCPU thread — keep them cheap;
- ``config_read`` / ``config_write``: device-specific config registers (return None/False to
  let the core's generic header and capability list answer); ``config.add_capability`` adds
  capabilities; ``config_changed`` follows guest writes to generic config space;
- ``bar_moved(index, old, new)``: re-register ioeventfds and the like;
- MSI-X: :class:`vmrun.core.msix.MsixVectors` (table and PBA in a BAR, masking, pending bits,
  delivery through KVM GSI routes + irqfd); MSI: set ``self.msi`` to a
  :class:`vmrun.core.msi.MsiCapability` (1-32 vectors, 64-bit address, per-vector masks; the
  core follows the guest's config writes to it and resets it); INTx: ``set_intx(level)``;
- ``realize()`` once placed, ``reset()`` on machine reset, ``close()`` at the end.

Virtio devices implement :class:`vmrun.core.virtio.device.VirtioDevice` and are wrapped in the
modern PCI transport :class:`vmrun.core.virtio.pci.VirtioPciTransport` by their factory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from vmrun.plugins.registry import DeviceType

hookspec = pluggy.HookspecMarker("vmrun")


@hookspec
def vmrun_register_devices(register: Callable[[DeviceType], None]) -> None:
    """Register device emulations: call ``register(DeviceType(...))`` once per emulation.

    A :class:`~vmrun.plugins.registry.DeviceType` names the emulation (bhyve's names:
    ``virtio-blk``, ``ahci-cd``, ``e1000``, ...), gives a one-line summary, declares its options
    (name, type, default, help) — the core validates a machine file's ``[devices.ID]`` table
    against them before anything starts — and a factory
    ``factory(ctx: DeviceContext, options: dict) -> PciDevice``.
    """


@hookspec
def vmrun_register_commands(cli: click.Group) -> None:
    """Add commands to the ``vmrun`` command line: call ``cli.add_command(...)`` with click
    commands. Called once when the CLI is built; a failing plugin is logged, not fatal."""


@hookspec
def vmrun_dsdt(devices: list) -> list[bytes] | None:
    """Contribute AML (bytes, encoded with :mod:`vmrun.core.aml`) to the DSDT's ``\\_SB`` scope.

    ``devices`` are the machine's placed :class:`~vmrun.plugins.registry.PlacedDevice` objects.
    Return None or a list of AML fragments.
    """
