"""Registers ``fbuf``: bhyve's framebuffer with its VNC server (``listen``, ``w``, ``h``,
``password``, ``wait``), as QEMU's bochs-display so that Linux's bochs DRM driver and OVMF's
QEMU video driver drive it without a VGA BIOS."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vmrun.api import (
    DeviceContext,
    DeviceType,
    Option,
    QmpCommand,
    QmpError,
    VmrunError,
    hookimpl,
)
from vmrun_fbuf_vnc.display import MAX_HEIGHT, MAX_WIDTH, BochsDisplay
from vmrun_fbuf_vnc.rfb import SHARE_POLICIES, Listen, VncServer

log = logging.getLogger("vmrun.fbuf")


def dirty_log_works() -> bool:
    """Whether this host's KVM keeps a dirty page log (the platform's probe, run once)."""
    from vmrun.api import dirty_log_works as probe

    return probe()


class FbufDevice(BochsDisplay):
    """A boot's display: shows its frame through the run's VNC server while it lives."""

    def __init__(self, server: VncServer, width: int, height: int) -> None:
        super().__init__(width, height)
        self.server = server

    def realize(self) -> None:
        self.server.attach(self)

    def load_device_state(self, state: dict) -> None:
        """The mode back, and the server's tracker starts over: the restored framebuffer
        was written by the host (no dirty page log saw it), so the next refresh compares
        the whole frame and every client, connected or new, gets all of it. VNC clients
        themselves are host-side: a restore starts with none."""
        super().load_device_state(state)
        self.server.attach(self)

    def close(self) -> None:
        self.server.detach(self)


def write_ppm(path, width: int, height: int, rgb: bytes) -> None:
    with open(path, "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (width, height) + rgb)


def _screendump(ctx, filename: str, device: str | None = None, head: int | None = None,
                format: str = "ppm") -> None:  # noqa: A002  (QEMU's argument name)
    """QEMU's ``screendump``: the display's current frame to ``filename`` (PPM or PNG)."""
    from vmrun_fbuf_vnc.client import write_png

    if format not in ("ppm", "png"):
        raise QmpError(f"Parameter 'format' does not accept value '{format[:20]}'")
    if head not in (None, 0):
        raise QmpError("this display has one head (0)")
    dev = ctx.device(device) if device is not None else next(
        (d for d in getattr(ctx.machine, "devices", ()) if isinstance(d, BochsDisplay)), None)
    if not isinstance(dev, BochsDisplay):
        raise QmpError(f"{device or 'the machine'}: no fbuf display" if device is None
                       else f"device '{device[:40]}' is not an fbuf display")
    path = Path(filename)
    if not path.is_absolute() or not path.parent.is_dir():
        raise QmpError(f"'{filename[:200]}': give an absolute path in an existing directory")
    w, h, rgb = dev.screen_rgb()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        (write_png if format == "png" else write_ppm)(tmp, w, h, rgb)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QmpError(f"'{filename[:200]}': {e.strerror}") from None


@hookimpl
def vmrun_qmp_commands(register) -> None:
    register(QmpCommand("screendump", _screendump,
                        {"filename": "str", "*device": "str", "*head": "int", "*format": "str"},
                        "the display's current frame to a PPM or PNG file"))


def _listen(value: str) -> None:
    Listen(value)


def _password(opts: dict[str, Any]) -> str | None:
    if opts["password"] is not None:
        return opts["password"]
    path: Path | None = opts["password_file"]
    if path is None:
        return None
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise VmrunError(f"{path}: {e.strerror}") from None
    return text[0] if text else ""


def _check(opts: dict[str, Any]) -> None:
    if opts["password"] is not None and opts["password_file"] is not None:
        e = ValueError("give password or password_file, not both")
        e.option = "password_file"       # type: ignore[attr-defined]
        raise e
    if opts["password"] is not None and not opts["password"]:
        e = ValueError("must not be empty (leave it out for no password)")
        e.option = "password"            # type: ignore[attr-defined]
        raise e


def _factory(ctx: DeviceContext, opts: dict[str, Any]) -> FbufDevice:
    def create() -> VncServer:
        try:
            server = VncServer(ctx.loop, ctx.input, listen=opts["listen"],
                               password=_password(opts), desktop_name=ctx.machine_name,
                               width=opts["w"], height=opts["h"],
                               dirty_log=dirty_log_works(), share=opts["share"])
        except OSError as e:
            raise VmrunError(f"devices.{ctx.id}.listen: cannot listen on {opts['listen']}: "
                             f"{e.strerror}") from None
        log.info("fbuf %s: VNC server on %s", ctx.id, opts["listen"])
        if opts["wait"]:
            log.warning("fbuf %s: waiting for a VNC client on %s before starting the guest",
                        ctx.id, opts["listen"])
            while not server.wait_for_client(0.5):
                pass
        return server

    server = ctx.host_resource("vnc", create)
    return FbufDevice(server, opts["w"], opts["h"])


OPTIONS = [
    Option("listen", "str", 'VNC server address: "HOST:PORT" or a unix socket path',
           "127.0.0.1:5900", validate=_listen),
    Option("w", "int", "preferred width the guest reads from the EDID", 1024, min=640,
           max=MAX_WIDTH),
    Option("h", "int", "preferred height the guest reads from the EDID", 768, min=480,
           max=MAX_HEIGHT),
    Option("password", "str", "VNC authentication password (only its first 8 bytes count)"),
    Option("password_file", "path", "file whose first line is the VNC password",
           must_exist=True),
    Option("wait", "bool", "hold the guest until the first VNC client connects", False),
    Option("share", "choice", 'what a client\'s shared flag does: "allow-exclusive" (a client '
           'asking for exclusive access disconnects the others), "force-shared" (such a client '
           'is turned away), "ignore" (everybody shares)', "allow-exclusive",
           choices=SHARE_POLICIES),
]


@hookimpl
def vmrun_register_commands(cli) -> None:
    import click

    @cli.command("screenshot")
    @click.argument("name")
    @click.argument("output", type=click.Path(dir_okay=False))
    def screenshot(name: str, output: str) -> None:
        """Save the display of the running VM NAME as a PNG (QMP screendump)."""
        from vmrun import instances
        from vmrun.qmp.client import QmpClient

        out = Path(output).absolute()
        vm = instances.find(name)
        with QmpClient(vm.qmp_path, timeout=30) as qmp:
            qmp.execute("screendump", filename=str(out), format="png")
        click.echo(f"{output}")

    @cli.command("vnc-capture")
    @click.argument("address")
    @click.argument("output", type=click.Path(dir_okay=False))
    @click.option("--password", help="VNC password, if the server asks for one.")
    def vnc_capture(address: str, output: str, password: str | None) -> None:
        """Save the frame an fbuf device's VNC server shows (ADDRESS: HOST:PORT or a unix
        socket path) as a PNG."""
        from vmrun_fbuf_vnc.client import AuthFailed, capture, write_png

        try:
            where = Listen(address)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="ADDRESS") from None
        target = where.unix or (where.host, where.port)
        try:
            w, h, rgb = capture(target, password)
        except (OSError, ConnectionError, AuthFailed) as e:
            raise VmrunError(f"{address}: {e}") from None
        write_png(output, w, h, rgb)
        click.echo(f"{output}: {w}x{h}")


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType("fbuf", "framebuffer (bochs-display) with a VNC server", _factory,
                        OPTIONS, check=_check))
