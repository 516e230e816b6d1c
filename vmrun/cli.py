"""The ``vmrun`` command line (click + rich).

Every error the user can cause is one red line on stderr and exit code 4; the guest's own
ending maps to bhyve's exit codes (0 reset, 1 power off, 2 halt, 3 triple fault).

Bad command lines included: :class:`VmrunGroup` runs click itself (``standalone_mode`` off) and
turns click's usage errors, :class:`VmrunError`, OS errors and any unexpected exception (a bug)
into one line through :func:`print_error`, which escapes control characters with
:func:`vmrun.errors.one_line`. ``-v`` adds the details (a traceback, a build log). Ctrl-C is one
line and exit code 130.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from vmrun.errors import VmrunError, one_line
from vmrun.units import parse_size

err_console = Console(stderr=True, highlight=False)
PROG = "vmrun"
INTERRUPTED = 130            # 128 + SIGINT, as a shell reports a program Ctrl-C ended
_verbose = False             # -v on vmrun or on vmrun up: details after an error line


def _set_verbose(on: bool) -> None:
    global _verbose
    if on:
        _verbose = True
        logging.getLogger().setLevel(logging.DEBUG)


def _end_live_displays() -> None:
    """Take any progress bar still on screen off it, so that the error line starts a line of
    its own and no half-drawn bar is left behind (or printed once more on a pipe)."""
    for live in reversed(list(getattr(err_console, "_live_stack", ()))):
        try:
            live.transient = True
            live.stop()
        except Exception:  # pragma: no cover - never let the display hide the error
            pass


def _fresh_line() -> None:
    """The guest may have left the shared terminal mid-line: end that line first, so the
    message is a line of its own."""
    from vmrun.chardev import console_needs_newline

    if console_needs_newline():
        err_console.file.write("\r\n")
        err_console.file.flush()


def print_error(message: object, detail: str = "") -> None:
    """``vmrun: MESSAGE`` as exactly one line on stderr (bold red on a terminal); ``detail``
    follows, as plain lines, only with ``-v``."""
    _end_live_displays()
    _fresh_line()
    err_console.print(Text(f"{PROG}: {one_line(message)}", style="bold red"), soft_wrap=True)
    if detail and _verbose:
        err_console.print(Text(detail.rstrip("\n")), soft_wrap=True)


def fail(message: str, code: int = 4) -> None:
    print_error(message)
    sys.exit(code)


def _command_words(ctx: click.Context | None) -> str:
    """``image create`` for ``vmrun image create``, whatever the program was called."""
    words = []
    while ctx is not None and ctx.parent is not None:
        words.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(words))


def _param_name(param: click.Parameter | None, ctx: click.Context | None) -> str:
    if param is None:
        return ""
    if isinstance(param, click.Option):
        return "/".join(param.opts)
    return param.human_readable_name if ctx is None else param.make_metavar(ctx)


def _lower_first(text: str) -> str:
    text = text.strip().removesuffix(".")
    return text[:1].lower() + text[1:] if text[1:2].islower() or len(text) == 1 else text


def usage_line(e: click.ClickException) -> str:
    """One click error as ``COMMAND: OPTION: what is wrong (try ...)``."""
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.BadParameter) and not isinstance(e, click.MissingParameter):
        name = e.param_hint if isinstance(e.param_hint, str) else _param_name(e.param, ctx)
        what = f"{name}: {_lower_first(e.message)}" if name else e.message
    else:
        what = e.format_message().replace(". Did you mean", "; did you mean")
    what = _lower_first(what)
    words = _command_words(ctx)
    line = f"{words}: {what}" if words else what
    if isinstance(e, click.UsageError):
        line += f" (try `{' '.join([PROG, words, '--help'] if words else [PROG, '--help'])}`)"
    return line


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def run_cli(command: click.Command, args: list[str], prog_name: str = PROG, **extra) -> int:
    """Parse ``args`` and run the command; the exit code, every error printed as one line."""
    global _verbose
    _verbose = False
    try:
        with command.make_context(prog_name, args, **extra) as ctx:
            command.invoke(ctx)
        return 0
    except click.exceptions.Exit as e:           # --help, --version
        return e.exit_code
    except _NO_ARGS_IS_HELP as e:                # plain `vmrun` or `vmrun image`: the help
        click.echo(e.ctx.get_help() if e.ctx else "")
        return 0
    except click.ClickException as e:            # usage errors, bad option values
        print_error(usage_line(e))
        return 4
    except VmrunError as e:
        print_error(e, getattr(e, "detail", ""))
        return e.exit_code
    except (KeyboardInterrupt, click.Abort):
        print_error("interrupted")
        return INTERRUPTED
    except OSError as e:
        if e.errno == errno.EPIPE:               # `vmrun devices | head`
            sys.stdout = click.utils.PacifyFlushWrapper(sys.stdout)  # type: ignore[assignment]
            return 1
        where = f"{e.filename}: " if e.filename is not None else ""
        print_error(f"{where}{e.strerror or e}")
        return 4
    except Exception as e:                       # a bug in vmrun: say so, traceback with -v
        message = one_line(str(e)) or "(no message)"
        print_error(f"internal error: {type(e).__name__}: {message}"
                    + ("" if _verbose else " (run with -v for the traceback)"),
                    traceback.format_exc())
        return 4


class _NamesItsCommand:
    """Puts the context on the usage errors click's parser raises without one, so the error
    line can say which command it is about."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except click.UsageError as e:
            if e.ctx is None:
                e.ctx = ctx
            raise


class VmrunCommand(_NamesItsCommand, click.Command):
    pass


class VmrunGroup(_NamesItsCommand, click.Group):
    """The top-level group (and its subgroups): runs the command line through
    :func:`run_cli` (one line per error) unless a caller asks for click's non-standalone
    mode."""

    command_class = VmrunCommand
    group_class = type

    def main(self, args=None, prog_name=None, complete_var=None,  # type: ignore[override]
             standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        prog_name = prog_name or PROG
        completion = getattr(self, "_main_shell_completion", None)
        if completion is not None:
            completion(extra, prog_name, complete_var)
        sys.exit(run_cli(self, list(sys.argv[1:] if args is None else args), prog_name,
                         **extra))


class FilePath(click.Path):
    """click.Path that also refuses a NUL byte (only reachable from Python, not argv)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and "\0" in value:
            self.fail(f"{value!r} contains a NUL byte", param, ctx)
        return super().convert(value, param, ctx)


def _file(**kw) -> FilePath:
    return FilePath(dir_okay=False, path_type=Path, **kw)


@click.group(name=PROG, cls=VmrunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug information to stderr.")
@click.version_option(package_name="vmrun")
def main(verbose: bool) -> None:
    """vmrun: run virtual machines on Linux/KVM from a TOML machine file."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="vmrun: %(message)s", stream=sys.stderr)
    _set_verbose(verbose)


@main.command()
@click.argument("machine_file", type=_file())
@click.option("-v", "--verbose", is_flag=True, help="Log debug information to stderr.")
@click.option("-d", "--detach", is_flag=True,
              help="Run in the background; print the VM's name once it runs.")
@click.option("--console", "console_mode", type=click.Choice(["socket", "pty"]),
              default="socket", show_default=True,
              help="With -d: where the stdio serial port goes (`vmrun console NAME`).")
@click.option("--restore", "restore", type=_file(exists=True),
              help="Start from this snapshot (`vmrun snapshot`) of the same machine.")
@click.option("--detached-child", type=int, hidden=True)
def up(machine_file: Path, verbose: bool, detach: bool, console_mode: str,
       restore: Path | None, detached_child: int | None) -> None:
    """Boot MACHINE_FILE and run it until the guest powers off.

    Exit codes (as bhyve): 0 reset (with on_reboot = "exit"), 1 power off, 2 halt,
    3 triple fault, 4 error. On the stdio console, C-a x quits and C-a C-a sends C-a.
    The VM serves QMP on its control socket while it runs (`vmrun ps`, `vmrun stop`).
    """
    from vmrun.background import run_vm, start_detached
    from vmrun.config import load_machine

    _set_verbose(verbose)
    _pull_referenced_images(machine_file)
    try:
        cfg = load_machine(machine_file)
    except VmrunError as e:
        if detached_child is not None:     # the parent of -d prints it
            os.write(detached_child, f"error: {one_line(e)}\n".encode())
        raise
    if restore is not None:
        from vmrun.snapshot import load_header

        load_header(restore)                # a bad file: one line before anything starts
        restore = restore.absolute()
    if detach:
        click.echo(start_detached(machine_file, cfg, console_mode, _verbose, restore))
        return
    runner_box: list = []

    def log(msg: str) -> None:
        _fresh_line()
        err_console.print(Text(f"vmrun: {one_line(msg)}"), soft_wrap=True)

    info = run_vm(cfg, log,
                  ready_fd=detached_child, console_mode=console_mode, runner_box=runner_box,
                  restore=restore)
    runner = runner_box[0]
    if info.code == 4:
        first, _, rest = info.reason.partition("\n")
        detail = (rest + "\n" + info.detail).strip()
        if info.detail and not _verbose:
            first += " (run with -v for the traceback)"
        print_error(first, detail)
    elif info.code == 3:
        print_error(info.reason.partition("\n")[0])
        if "\n" in info.reason:      # the registers: the guest's own ending, not an error
            err_console.print(Text(info.reason.partition("\n")[2]), soft_wrap=True)
    elif _verbose:
        err_console.print(Text(f"vmrun: {one_line(info.reason)} (exit {int(info.code)})"),
                          soft_wrap=True)
    for value, t in runner.boot_log.markers:
        logging.debug("boot marker %d at %.3fs", value, t)
    sys.exit(int(info.code))


@main.command()
@click.argument("machine_file", type=_file())
def check(machine_file: Path) -> None:
    """Validate MACHINE_FILE without starting anything."""
    from vmrun.config import load_machine

    cfg = load_machine(machine_file)
    err_console.print(Text(one_line(f"{machine_file}: ok ({cfg.name}: {cfg.cpus} vCPU, "
                                    f"{cfg.memory >> 20} MiB)")), soft_wrap=True)


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
@click.argument("path", type=_file())
@click.option("--size", callback=_size,
              help="Disk size, e.g. 20G (a qcow2 overlay: default the backing file's).")
@click.option("--sparse", "fmt", flag_value="sparse", help="Sparse image (<path>.lut).")
@click.option("--raw", "fmt", flag_value="raw", default=True, help="Raw image (default).")
@click.option("--format", "format_", type=click.Choice(["raw", "sparse", "qcow2"]),
              help="Image format (instead of --raw / --sparse).")
@click.option("--split", callback=_size, help="Split into segment files of this size.")
@click.option("--sectorsize", type=int, default=512, show_default=True,
              help="Sector size of a sparse image's LUT.")
@click.option("--backing", help="qcow2: an overlay of this image (relative to PATH's folder).")
@click.option("--cluster-size", callback=_size, help="qcow2: cluster size (default 64K).")
def image_create(path: Path, size: int | None, fmt: str, format_: str | None,
                 split: int | None, sectorsize: int, backing: str | None,
                 cluster_size: int | None) -> None:
    """Create an empty disk image at PATH (raw, the xhyve fork's sparse/split format, or
    qcow2, optionally over a backing file)."""
    from vmrun.block import create_image

    fmt = format_ or fmt
    create_image(path, size, fmt, split=split, sector_size=sectorsize, backing=backing,
                 cluster_size=cluster_size)
    size = size if size is not None else _image_size(path)
    err_console.print(Text(one_line(f"created {path} ({fmt}, {size} bytes"
                                    + (f", backing file {backing})" if backing else ")"))),
                      soft_wrap=True)


def _image_size(path: Path) -> int:
    from vmrun.block import open_disk

    with open_disk(path, read_only=True) as disk:
        return disk.size


@image.command("convert")
@click.argument("src", type=_file())
@click.argument("dst", type=_file())
@click.option("--to", "fmt", type=click.Choice(["raw", "sparse", "qcow2"]), required=True,
              help="Format of DST.")
@click.option("--split", callback=_size, help="Split DST into segment files of this size.")
@click.option("--sectorsize", type=int, help="Sector size of DST (default: SRC's).")
@click.option("--src-split", callback=_size, help="Segment size of a split SRC.")
@click.option("--src-sectorsize", type=int, default=512, show_default=True,
              help="Sector size of a sparse SRC.")
@click.option("--cluster-size", callback=_size, help="qcow2 DST: cluster size (default 64K).")
def image_convert(src: Path, dst: Path, fmt: str, split: int | None, sectorsize: int | None,
                  src_split: int | None, src_sectorsize: int, cluster_size: int | None) -> None:
    """Copy disk image SRC into a new image DST of another format (raw, sparse/split, qcow2;
    a qcow2 SRC is read through its backing files).

    All-zero chunks are skipped, so a sparse or qcow2 DST only stores what SRC holds."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from vmrun.block import convert_image

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=err_console) as progress:
        task = progress.add_task(escape(one_line(f"{src.name} -> {dst.name}")), total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            convert_image(src, dst, fmt, split=split, sector_size=sectorsize, progress=report,
                          src_split=src_split, src_sector_size=src_sectorsize,
                          cluster_size=cluster_size)
        except BaseException:
            # An error: take the bar off the screen (and print no final bar nor the blank
            # line rich ends a non-terminal progress with), so the error is the only line.
            progress.live.transient = True
            progress.live.stop()
            progress.disable = True
            raise


@image.command("pull")
@click.argument("name")
def image_pull(name: str) -> None:
    """Download catalogue image NAME (e.g. ubuntu-24.04) into the cache, verified against the
    distribution's checksum list; an interrupted pull resumes. `vmrun image ls` lists them."""
    from vmrun.catalogue import lookup, pull

    lookup(name)
    _pull_with_progress(name, pull)


def _pull_referenced_images(machine_file: Path) -> None:
    """``up`` first pulls the catalogue images the machine file names and the cache lacks
    (with progress), so a first ``vmrun up machines/ubuntu.toml`` just works."""
    from vmrun.catalogue import is_pulled, lookup, pull, referenced
    from vmrun.config import read_machine_file

    for name in referenced(read_machine_file(machine_file)):
        if not is_pulled(lookup(name)):
            err_console.print(Text(f"vmrun: pulling {name} (first use)"), soft_wrap=True)
            _pull_with_progress(name, pull)


def _pull_with_progress(name: str, pull) -> Path:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err_console) as progress:
        def per_file(label: str):
            task = progress.add_task(escape(one_line(label)), total=None)

            def report(done: int, total: int | None) -> None:
                progress.update(task, completed=done, total=total)
            return report

        try:
            return pull(name, per_file)
        except BaseException:
            progress.live.transient = True
            progress.live.stop()
            progress.disable = True
            raise


@image.command("ls")
def image_ls() -> None:
    """List the cached images with their sizes (catalogue images and built ones)."""
    from rich.table import Table

    from vmrun.catalogue import CATALOGUE, cached

    table = Table("name", "size", "state", "files", box=None)
    have = {c.name: c for c in cached()}
    for c in have.values():
        state = "ready" if c.complete else "partial (pull resumes)"
        table.add_row(escape(c.name), _human(c.size), state, escape(", ".join(c.files)))
    for name, img in CATALOGUE.items():
        if name not in have:
            table.add_row(escape(name), "-", "not pulled", escape(img.title))
    Console().print(table)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@image.command("rm")
@click.argument("name")
def image_rm(name: str) -> None:
    """Remove image NAME from the cache (a pulled or a built one, partial downloads too)."""
    from vmrun.catalogue import remove

    freed = remove(name)
    err_console.print(Text(one_line(f"removed {name} ({_human(freed)})")), soft_wrap=True)


@image.command("check")
@click.argument("path", type=_file())
@click.option("--split", callback=_size, help="Segment size of a split image.")
@click.option("--sectorsize", type=int, default=512, show_default=True,
              help="Sector size of a sparse image's LUT.")
def image_check(path: Path, split: int | None, sectorsize: int) -> None:
    """Check the disk image at PATH (raw, sparse, split or qcow2: its tables and reference
    counts, leaks and corruptions): prints "ok" or one line per problem; exit code 0 or 4."""
    from vmrun.block.image_tools import check_image

    problems = check_image(path, split=split, sectorsize=sectorsize)
    if not problems:
        click.echo("ok")
        return
    for problem in problems:
        print_error(problem)
    sys.exit(4)


@image.command("info")
@click.argument("path", type=_file())
@click.option("--split", callback=_size, help="Segment size of a split image.")
@click.option("--sectorsize", type=int, default=512, show_default=True,
              help="Sector size of a sparse image's LUT.")
def image_info(path: Path, split: int | None, sectorsize: int) -> None:
    """Show the disk image at PATH: format, virtual size, and for qcow2 the cluster size,
    the backing chain and the bytes allocated."""
    from vmrun.block.image_tools import info_lines

    for line in info_lines(path, split=split, sectorsize=sectorsize):
        click.echo(one_line(line))


@main.command()
@click.argument("name", required=False)
def devices(name: str | None) -> None:
    """List the device emulations every installed plugin offers, or NAME's options."""
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
            print_error(f"plugin {plugin} is broken: {why}")
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
        if opt.type == "list" and opt.choices:
            typ = "list of " + " | ".join(opt.choices)
        default = "(required)" if opt.required else ("-" if opt.default is None
                                                     else repr(opt.default))
        table.add_row(escape(opt.name), escape(typ), escape(default), escape(opt.help))
        for sub in opt.fields:        # a "tables" option: one row per field of its tables
            typ = sub.type if sub.type != "choice" else " | ".join(sub.choices)
            default = "(required)" if sub.required else ("-" if sub.default is None
                                                         else repr(sub.default))
            table.add_row(escape(f"{opt.name}[].{sub.name}"), escape(typ), escape(default),
                          escape(sub.help))
    out.print(table)


# -- background VMs -------------------------------------------------------------------------------
@main.command()
def ps() -> None:
    """List the running VMs: name, state, vCPUs, memory, uptime, pid, console."""
    from rich.table import Table

    from vmrun.background import ps_rows

    table = Table(title="vmrun VMs")
    for col in ("name", "state", "vCPUs", "memory", "uptime", "pid", "console"):
        table.add_column(col)
    for row in ps_rows():
        table.add_row(*(escape(one_line(x)) for x in row))
    Console().print(table)


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="End the VM at once (QMP quit), no power button.")
@click.option("--timeout", "grace", type=click.FloatRange(0, 3600), default=30.0,
              show_default=True, help="Seconds the guest has to power off before it is ended.")
def stop(name: str, force: bool, grace: float) -> None:
    """Press NAME's ACPI power button; end it if the guest has not powered off in time."""
    from vmrun.background import stop as stop_vm

    err_console.print(Text(one_line(stop_vm(name, force, grace))), soft_wrap=True)


@main.command()
@click.argument("name")
@click.argument("file", type=_file())
def snapshot(name: str, file: Path) -> None:
    """Save the running VM NAME to FILE (and FILE.ram); `vmrun up --restore FILE` resumes it."""
    from vmrun import instances
    from vmrun.qmp.client import QmpClient

    vm = instances.find(name)
    with QmpClient(vm.qmp_path, timeout=600) as c:
        info = c.execute("x-vmrun-snapshot-save", file=str(file.absolute()))
    err_console.print(Text(one_line(
        f"{name}: saved to {info['file']} in {info['seconds']:g}s "
        f"({info['ram-bytes'] >> 20} MiB of RAM written)"
        + (f"; this host's KVM refused: {', '.join(info['refused'])}" if info["refused"]
           else ""))), soft_wrap=True)


@main.command()
@click.argument("name")
def kill(name: str) -> None:
    """End NAME at once (SIGKILL to its vmrun); no shutdown, nothing stale left."""
    from vmrun.background import kill as kill_vm

    err_console.print(Text(one_line(kill_vm(name))), soft_wrap=True)


@main.command()
@click.argument("name")
def console(name: str) -> None:
    """Attach to NAME's serial console: C-a d detaches, C-a x quits the VM, C-a C-a sends C-a."""
    from vmrun.background import console as attach

    how = attach(name)
    err_console.print(Text(one_line(f"vmrun: {name}: {how}")), soft_wrap=True)


@main.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the VM ends.")
def logs(name: str, follow: bool) -> None:
    """Print the log (vmrun's output) of the background VM NAME."""
    import time

    from vmrun import instances

    path = instances.log_path(name)
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        while True:
            data = f.read(65536)
            if data:
                out.write(data)
                out.flush()
                continue
            if not follow or not instances.is_running(path.parent):
                break
            time.sleep(0.2)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for the guest's sshd.")
def ssh(name: str, command: tuple[str, ...], timeout: float) -> None:
    """Log in to the running VM NAME through its forwarded ssh port (vmrun's own key, the
    [cloud-init] user); `vmrun ssh NAME -- CMD ARGS` runs a command. Waits for sshd."""
    from vmrun import ssh as vmssh

    with err_console.status(escape(f"waiting for {name}'s sshd")) as status:
        def waiting(why: str) -> None:
            status.update(escape(f"waiting for {name}'s sshd ({why})"))

        from vmrun import instances

        t = vmssh.target(instances.find(name))
        vmssh.wait_for_sshd(t.host, t.port, timeout, waiting)
    argv = vmssh.ssh_argv(t, command)
    os.execv(argv[0], argv)


def _plugin_commands() -> None:
    """Let plugins add commands (vmrun_register_commands)."""
    try:
        from vmrun.plugins import get_registry

        get_registry().pm.hook.vmrun_register_commands(cli=main)
    except Exception as e:  # a broken plugin must not break the CLI
        logging.getLogger("vmrun").warning("plugin commands: %s", one_line(e))


_plugin_commands()

if __name__ == "__main__":
    main()
