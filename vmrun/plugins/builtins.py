"""The built-in device emulations, registered through the same hooks as third-party plugins:
``hostbridge``, ``amd_hostbridge``, ``lpc``, ``uart`` (a PCI 16550) and ``virtio-rnd``."""

from __future__ import annotations

import os
import stat
from typing import Any

from vmrun.core.pci import BAR_IO, BarSpec, PciDevice
from vmrun.core.virtio.pci import VirtioPciTransport
from vmrun.devices.virtio_rnd import VirtioRng
from vmrun.plugins import hookimpl
from vmrun.plugins.registry import DeviceContext, DeviceType, Option
from vmrun.units import check_output_file

UNIX_PATH_MAX = 107                # sun_path is 108 bytes including the NUL


class HostBridge(PciDevice):
    """The PCI host bridge at 00:00.0 (bhyve's identity)."""

    name = "hostbridge"
    class_code = 0x060000

    def __init__(self, vendor: int = 0x1275, device: int = 0x1275) -> None:
        self.vendor_id = vendor
        self.device_id = device

    def device_state(self) -> dict:
        return {}                   # config space only


class LpcBridge(PciDevice):
    """The PCI-ISA (LPC) bridge at slot 31: the legacy devices (COM ports, RTC, i8042) live
    behind it, at their fixed ISA ports."""

    name = "lpc"
    vendor_id = 0x8086
    device_id = 0x7000
    class_code = 0x060100

    def device_state(self) -> dict:
        return {}


class _IntxLine:
    """Adapts a UART's interrupt output to its PCI function's INTA#."""

    def __init__(self, dev: PciDevice) -> None:
        self.dev = dev

    def set_level(self, level: bool) -> None:
        self.dev.set_intx(level)


class PciUart(PciDevice):
    """A 16550A behind a PCI function (BAR 0: 8 I/O ports), as bhyve's ``uart``."""

    name = "uart"
    vendor_id = 0x131F
    device_id = 0x2000
    class_code = 0x070002
    interrupt_pin = 1
    bars = [BarSpec(0, 8, BAR_IO)]

    def __init__(self, backend: Any) -> None:
        from vmrun.devices.uart import Uart16550

        self.backend = backend
        self.uart = Uart16550(_IntxLine(self), backend.write)
        backend.attach(self.uart)

    def device_state(self) -> dict:
        return self.uart.save_state()

    def load_device_state(self, state: dict) -> None:
        self.uart.load_state(state)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return self.uart.read(offset, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.uart.write(offset, size, value)

    def close(self) -> None:
        self.backend.close()


def _uart_factory(ctx: DeviceContext, opts: dict[str, Any]) -> PciDevice:
    from vmrun.chardev import open_backend

    return PciUart(open_backend(ctx.id, opts["backend"], opts["path"], ctx.loop))


def _uart_check(opts: dict[str, Any]) -> None:
    """The backend's path as the serial ports' (see vmrun.config): a file backend writes to
    a regular file or a character device in an existing directory, never a directory or a
    FIFO (opening one would wait for a reader); a socket backend never replaces a
    non-socket. Checked here, so ``vmrun check`` refuses what opening the backend would."""
    backend, path = opts["backend"], opts["path"]
    if backend in ("file", "socket") and path is None:
        raise ValueError(f"backend {backend} needs a path")
    if backend not in ("file", "socket") and path is not None:
        raise ValueError(f"backend {backend} takes no path")
    if path is None:
        return
    try:
        if backend == "file":
            check_output_file(path)
        elif not path.parent.is_dir():
            raise ValueError(f"directory {path.parent} does not exist")
        elif path.exists() and not stat.S_ISSOCK(path.stat().st_mode):
            raise ValueError(f"{path} exists and is not a socket")
        elif len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(f"unix socket paths are at most {UNIX_PATH_MAX} bytes, {path} is "
                             f"{len(os.fsencode(path))}")
    except ValueError as e:
        e.option = "path"   # type: ignore[attr-defined]   # on devices.ID.path, as written
        raise


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType(
        "hostbridge", "PCI host bridge (00:00.0)",
        lambda ctx, o: HostBridge(), fixed_slot=0))
    register(DeviceType(
        "amd_hostbridge", "PCI host bridge with AMD's identity",
        lambda ctx, o: HostBridge(0x1022, 0x7432), fixed_slot=0))
    register(DeviceType(
        "lpc", "PCI-ISA bridge holding the legacy devices (COM ports, RTC, i8042)",
        lambda ctx, o: LpcBridge(), fixed_slot=31))
    register(DeviceType(
        "uart", "16550A UART on a PCI function",
        _uart_factory,
        options=[
            Option("backend", "choice", "where its bytes go", default="null",
                   choices=("stdio", "file", "socket", "pty", "null")),
            Option("path", "path", "file or unix socket path (file and socket backends)"),
        ],
        check=_uart_check, exclusive_paths=("path",)))
    register(DeviceType(
        "virtio-rnd", "virtio entropy source fed by the host's getrandom()",
        lambda ctx, o: VirtioPciTransport(VirtioRng(rate=o["rate"])),
        options=[Option("rate", "int", "bytes per second the guest may take (0: no limit)",
                        default=0, min=0, max=1 << 30)]))
