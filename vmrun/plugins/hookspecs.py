"""vmrun's plugin hooks (pluggy project name and entry-point group: "vmrun").

A plugin is a module (or object) with functions marked ``@hookimpl``; a separately installed
distribution announces it with an entry point::

    [project.entry-points.vmrun]
    virtio_blk = "vmrun_virtio_blk.plugin"

Built-in emulations (hostbridge, lpc, uart, virtio-rnd) and the built-in QMP commands
(``query-status``, ``stop``, ...) register through exactly the same hooks.

A plugin imports only :mod:`vmrun.api` (``hookimpl``, ``DeviceType``, ``Option``,
``PciDevice``, ...): that is the stable contract. The README's "Writing a device plugin" walks
through a complete device (``tests/plugin_example``, ``pci-echo``). In short, a factory gets a
:class:`~vmrun.plugins.registry.DeviceContext` (the device id, the machine's name and uuid,
``loop``, ``input``, ``host_resource()`` for host-side things that outlive a reboot) and
returns a :class:`vmrun.core.pci.PciDevice`, which

- sets its identity, ``bars`` (:class:`~vmrun.core.pci.BarSpec`) and answers
  ``bar_read``/``bar_write`` (vCPU threads: cheap, never raising), optionally
  ``config_read``/``config_write`` for device-specific config registers;
- declares ``msix_vectors`` (with a free ``msix_bar``) and/or ``msi_vectors``: the core builds
  ``self.irq`` (capabilities, table and PBA, routes, irqfds, masking, reset) and the device
  calls ``self.irq.trigger(vector)`` (MSI-X, else MSI, else INTA#); without vectors,
  ``set_intx(level)``;
- does its work on the event loop ``self.loop``: ``add_doorbell()`` in ``realize()``
  (an ioeventfd), ``call_soon`` from ``bar_write``, timers, host fds; a callback that raises
  reaches ``fault(reason)`` and breaks only that device;
- touches guest memory only through ``self.dma`` (``SgList``, refused while bus mastering is
  off; ``GuestError`` for whatever the guest got wrong);
- has ``realize()`` once placed, ``reset()`` on machine reset, ``close()`` at the end;
- for snapshots (``vmrun snapshot``), returns its guest-visible state from
  ``device_state()`` as plain data and takes it back in ``load_device_state(state)``
  (``vmrun.api.save_fields``/``load_fields`` do it for plain register attributes;
  ``versioned``/``check_version`` put a device's own fields in the versioned shape and
  refuse another version); the core saves config space and MSI/MSI-X itself, and the
  contents of RAM BARs with guest RAM. ``device_state()`` runs with the vCPUs paused and
  the event loop held (none of the device's callbacks run meanwhile; ``self.loop.sync()``
  runs the calls queued since, e.g. completions of I/O it drained): it finishes what it
  has in flight first, or saves it. ``load_device_state()`` gets a fresh, realized device
  (its backends are the new run's) and re-arms its timers. A device that does not
  implement them makes a snapshot fail with one line naming it (never a silently wrong
  restore). A virtio device implements ``save_state()``/``load_state()`` (the transport
  saves the queues), finishing what it has in flight first.

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
    from vmrun.qmp.registry import QmpCommand

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


@hookspec
def vmrun_qmp_commands(register: Callable[[QmpCommand], None]) -> None:
    """Add commands to the QMP control socket: call ``register(QmpCommand(...))`` once each.

    A :class:`~vmrun.qmp.registry.QmpCommand` is a name (QEMU's where one exists:
    ``screendump``, ``eject``, ``blockdev-change-medium``), a handler
    ``handler(ctx: QmpContext, **arguments)``, the arguments QAPI-style
    (``{"device": "str", "*force": "bool"}``, checked before the handler runs) and a summary.
    The handler runs on the control thread; ``ctx.device(id)`` is the device of
    ``[devices.ID]`` in the current boot, ``ctx.emit(event, data)`` sends an event; it returns
    the ``return`` value (None for ``{}``) or raises :class:`~vmrun.qmp.QmpError`. A name
    another plugin (or the core) already registered marks the plugin broken, as for devices.
    """
