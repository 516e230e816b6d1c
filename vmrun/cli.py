"""The ``vmrun`` command line (click + rich).

Every error the user can cause is one red line on stderr and exit code 4; the guest's own
ending maps to bhyve's exit codes (0 reset, 1 power off, 2 halt, 3 triple fault).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from vmrun.errors import VmrunError
from vmrun.units import parse_size

err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 4) -> None:
    err_console.print(f"[bold red]vmrun: {escape(message)}[/]", markup=True, soft_wrap=True)
    sys.exit(code)


class VmrunGroup(click.Group):
    """Turns VmrunError anywhere below into one red line and exit 4."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except VmrunError as e:
            first, _, rest = str(e).partition("\n")
            err_console.print(f"[bold red]vmrun: {escape(first)}[/]", soft_wrap=True)
            if rest:
                err_console.print(rest, markup=False, highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)


@click.group(cls=VmrunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug information to stderr.")
@click.version_option(package_name="vmrun")
def main(verbose: bool) -> None:
    """vmrun: run virtual machines on Linux/KVM from a TOML machine file."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="vmrun: %(message)s", stream=sys.stderr)


@main.command()
@click.argument("machine_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="Log debug information to stderr.")
def up(machine_file: Path, verbose: bool) -> None:
    """Boot MACHINE_FILE and run it until the guest powers off.

    Exit codes (as bhyve): 0 reset (with on_reboot = "exit"), 1 power off, 2 halt,
    3 triple fault, 4 error. On the stdio console, C-a x quits and C-a C-a sends C-a.
    """
    from vmrun.config import load_machine
    from vmrun.runner import Runner

    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    cfg = load_machine(machine_file)
    runner = Runner(cfg, log=lambda msg: err_console.print(f"vmrun: {msg}", markup=False,
                                                           highlight=False))
    info = runner.run()
    level = logging.getLogger().level
    if info.code == 4:
        first, _, rest = info.reason.partition("\n")
        err_console.print(f"[bold red]vmrun: {escape(first)}[/]", soft_wrap=True)
        if rest or info.detail:
            err_console.print((rest + "\n" + info.detail).strip(), markup=False,
                              highlight=False, soft_wrap=True)
    elif info.code == 3:
        err_console.print(f"[bold red]vmrun: {escape(info.reason.splitlines()[0])}[/]",
                          soft_wrap=True)
        if "\n" in info.reason:
            err_console.print(info.reason.partition("\n")[2], markup=False, highlight=False)
    elif level <= logging.DEBUG:
        err_console.print(f"vmrun: {info.reason} (exit {int(info.code)})", markup=False)
    for value, t in runner.boot_log.markers:
        logging.debug("boot marker %d at %.3fs", value, t)
    sys.exit(int(info.code))


@main.command()
@click.argument("machine_file", type=click.Path(dir_okay=False, path_type=Path))
def check(machine_file: Path) -> None:
    """Validate MACHINE_FILE without starting anything."""
    from vmrun.config import load_machine

    cfg = load_machine(machine_file)
    err_console.print(f"{machine_file}: ok ({cfg.name}: {cfg.cpus} vCPU, "
                      f"{cfg.memory >> 20} MiB)", markup=False, highlight=False)


@main.group()
def image() -> None:
    """Build and manage guest images (cached in ~/.cache/vmrun)."""


@image.command("build")
@click.argument("name", default="tiny")
@click.option("--force", is_flag=True, help="Rebuild even if the cached image is up to date.")
def image_build(name: str, force: bool) -> None:
    """Build the guest image NAME (default: tiny): kernel + busybox initramfs."""
    from vmrun.image import ImageBuilder

    ImageBuilder(err_console).build(name, force=force)


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@image.command("create")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", required=True, callback=_size, help="Disk size, e.g. 20G.")
@click.option("--sparse", "fmt", flag_value="sparse", help="Sparse image (<path>.lut).")
@click.option("--raw", "fmt", flag_value="raw", default=True, help="Raw image (default).")
@click.option("--split", callback=_size, help="Split into segment files of this size.")
@click.option("--sectorsize", type=int, default=512, show_default=True,
              help="Sector size of a sparse image's LUT.")
def image_create(path: Path, size: int, fmt: str, split: int | None, sectorsize: int) -> None:
    """Create an empty disk image at PATH (raw, or the xhyve fork's sparse/split format)."""
    from vmrun.block import create_image

    create_image(path, size, fmt, split=split, sector_size=sectorsize)
    err_console.print(f"created {path} ({fmt}, {size} bytes)", markup=False, highlight=False)


@image.command("convert")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--to", "fmt", type=click.Choice(["raw", "sparse"]), required=True,
              help="Format of DST.")
@click.option("--split", callback=_size, help="Split DST into segment files of this size.")
@click.option("--sectorsize", type=int, help="Sector size of DST (default: SRC's).")
@click.option("--src-split", callback=_size, help="Segment size of a split SRC.")
@click.option("--src-sectorsize", type=int, default=512, show_default=True,
              help="Sector size of a sparse SRC.")
def image_convert(src: Path, dst: Path, fmt: str, split: int | None, sectorsize: int | None,
                  src_split: int | None, src_sectorsize: int) -> None:
    """Copy disk image SRC into a new image DST of another format (raw <-> sparse/split).

    All-zero chunks are skipped, so a sparse DST only stores what SRC holds."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from vmrun.block import convert_image

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=err_console) as progress:
        task = progress.add_task(f"{src.name} -> {dst.name}", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        convert_image(src, dst, fmt, split=split, sector_size=sectorsize, progress=report,
                      src_split=src_split, src_sector_size=src_sectorsize)


@main.command()
@click.argument("name", required=False)
def devices(name: str | None) -> None:
    """List the device emulations every installed plugin offers, or NAME's options."""
    from rich.markup import escape
    from rich.table import Table

    from vmrun.plugins import get_registry

    reg = get_registry()
    out = Console()
    if name is None:
        table = Table(title="vmrun device emulations")
        for col in ("name", "summary", "plugin", "version"):
            table.add_column(col)
        for dtype in sorted(reg.devices.values(), key=lambda d: d.name):
            table.add_row(escape(dtype.name), escape(dtype.summary), escape(dtype.plugin),
                          escape(dtype.version))
        out.print(table)
        for plugin, why in reg.broken.items():
            err_console.print(f"[bold red]vmrun: plugin {plugin} is broken: {why}[/]")
        return
    dtype = reg.get(name)
    if dtype is None:
        raise VmrunError(f"no device emulation named {name!r} (see `vmrun devices`)")
    out.print(f"[bold]{escape(dtype.name)}[/]: {escape(dtype.summary)} "
              f"({escape(dtype.plugin)} {escape(dtype.version)})")
    if dtype.fixed_slot is not None:
        out.print(f"always in PCI slot {dtype.fixed_slot}")
    table = Table()
    for col in ("option", "type", "default", "help"):
        table.add_column(col)
    for opt in dtype.options:
        typ = opt.type if opt.type != "choice" else " | ".join(opt.choices)
        default = "(required)" if opt.required else ("-" if opt.default is None
                                                     else repr(opt.default))
        table.add_row(escape(opt.name), escape(typ), escape(default), escape(opt.help))
    out.print(table)


def _plugin_commands() -> None:
    """Let plugins add commands (vmrun_register_commands)."""
    try:
        from vmrun.plugins import get_registry

        get_registry().pm.hook.vmrun_register_commands(cli=main)
    except Exception as e:  # a broken plugin must not break the CLI
        logging.getLogger("vmrun").warning("plugin commands: %s", e)


_plugin_commands()

if __name__ == "__main__":
    main()
