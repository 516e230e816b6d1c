"""Build the default guest ("tiny"): a small kernel and a busybox initramfs.

The kernel comes from Debian's ``linux-source-6.1`` with ``guest/tiny.config`` merged on top of
``tinyconfig``; the initramfs holds Debian's static busybox, ``guest/init`` and ``blkbench``
(``guest/blkbench.c`` built static: the block benchmark's fio stand-in). Both are cached
outside the repository (``$XDG_CACHE_HOME/vmrun``, default ``~/.cache/vmrun``) under keys made
of their inputs: the kernel is only rebuilt when the config fragment or the source package
changes, the initramfs when one of its files or this builder does. Machine files name them as
``image:tiny/vmlinux`` and ``image:tiny/initramfs.cpio``.

The initramfs is not compressed and already holds busybox's applet links: where KVM emulates
guest kernel code (~0.7 M instructions/s), the kernel's gunzip of a 1.3 MiB initramfs was
about half of the whole boot (minutes), and ``busybox --install`` at start-up a system call per
link; a plain cpio is copied, and its links made, in seconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from vmrun.errors import VmrunError

GUEST_DIR = Path(__file__).parent / "guest"
KERNEL_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX = Path("/bin/busybox")
# A tinyconfig + drivers build compiles about this many objects; used only for the progress bar.
KERNEL_OBJECTS_ESTIMATE = 1400
IMAGES = ("tiny",)
INITRAMFS = "initramfs.cpio"


def cache_dir() -> Path:
    """Where built images live: outside the repository, shared by every checkout."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmrun"


def image_dir(name: str) -> Path:
    return cache_dir() / "images" / name


def resolve_image_path(spec: str) -> Path:
    """Map ``image:NAME/FILE`` to the cached file (which may not exist yet)."""
    rest = spec.removeprefix("image:")
    return cache_dir() / "images" / rest


def _key(files: tuple[Path, ...], packages: tuple[Path, ...], salt: str = "") -> str:
    """A short hash of file contents and of installed packages' files (size and mtime)."""
    h = hashlib.sha256(salt.encode())
    for p in files:
        h.update(p.read_bytes())
    for p in packages:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _kernel_key() -> str:
    return _key((GUEST_DIR / "tiny.config",), (KERNEL_SOURCE,))


def _inputs_key() -> str:
    return _key((GUEST_DIR / "init", GUEST_DIR / "blkbench.c", Path(__file__)), (BUSYBOX,),
                _kernel_key())


def _need(path: Path, package: str) -> None:
    if not path.exists():
        raise VmrunError(f"{path} is missing: install the Debian package {package} "
                         "(make deps does)")


def fragment_options(text: str) -> dict[str, str]:
    """The options a config fragment sets: ``CONFIG_X -> value`` (``n`` for "is not set")."""
    opts: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            opts[m.group(1)] = m.group(2)
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            opts[m.group(1)] = "n"
    return opts


def check_config(fragment: str, final: str) -> list[str]:
    """Options of the fragment that Kconfig dropped or changed (each one line)."""
    want = fragment_options(fragment)
    have = fragment_options(final)
    bad = []
    for key, value in want.items():
        got = have.get(key, "n")
        if got != value:
            bad.append(f"{key}: wanted {value}, kernel config has {got}")
    return bad


class ImageBuilder:
    """Builds one named image into the cache, showing progress on a rich console."""

    def __init__(self, console: Console | None = None, jobs: int | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.jobs = jobs or (os.cpu_count() or 1) + 1

    def build(self, name: str = "tiny", force: bool = False) -> Path:
        if name not in IMAGES:
            raise VmrunError(f"unknown image {name!r} (known: {', '.join(IMAGES)})")
        _need(KERNEL_SOURCE, "linux-source-6.1")
        _need(BUSYBOX, "busybox-static")
        out = image_dir(name)
        key = _inputs_key()
        stamp = out / "key"
        if not force and stamp.exists() and stamp.read_text().strip() == key:
            if (out / "vmlinux").exists() and (out / INITRAMFS).exists():
                self.console.print(f"[green]image {name} is up to date[/] ({out})")
                return out
        out.mkdir(parents=True, exist_ok=True)
        kernel_key = _kernel_key()
        kernel_stamp = out / "kernel-key"
        if force or not (out / "vmlinux").exists() or not kernel_stamp.exists() or \
                kernel_stamp.read_text().strip() != kernel_key:
            vmlinux = self.build_kernel(kernel_key)
            tmp = out / "vmlinux.tmp"
            shutil.copyfile(vmlinux, tmp)
            os.replace(tmp, out / "vmlinux")
            kernel_stamp.write_text(kernel_key + "\n")
        self.console.print("building initramfs (busybox, init, blkbench)")
        data = build_initramfs(BUSYBOX, (GUEST_DIR / "init").read_bytes(),
                               {"bin/blkbench": compile_static(GUEST_DIR / "blkbench.c")},
                               busybox_applets(BUSYBOX))
        tmp = out / "initramfs.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / INITRAMFS)
        (out / "initramfs.cpio.gz").unlink(missing_ok=True)     # what older vmruns built
        stamp.write_text(key + "\n")
        self.console.print(f"[green]image {name} built[/] in {out}")
        return out

    # -- kernel -------------------------------------------------------------
    def build_kernel(self, key: str) -> Path:
        build_root = cache_dir() / "build"
        src = build_root / "linux-source-6.1"
        if not (src / "Makefile").exists():
            self._extract(build_root)
        fragment = (GUEST_DIR / "tiny.config").read_text()
        config_stamp = src / ".vmrun-config-key"
        if not config_stamp.exists() or config_stamp.read_text() != key:
            self.console.print("configuring kernel (tinyconfig + vmrun/guest/tiny.config)")
            env = dict(os.environ, ARCH="x86_64")
            self._run(["make", "ARCH=x86_64", "tinyconfig"], src, env)
            frag_path = src / "vmrun.config"
            frag_path.write_text(fragment)
            self._run(["scripts/kconfig/merge_config.sh", "-m", ".config", "vmrun.config"], src,
                      env)
            self._run(["make", "ARCH=x86_64", "olddefconfig"], src, env)
            bad = check_config(fragment, (src / ".config").read_text())
            if bad:
                raise VmrunError("kernel config lost options: " + "; ".join(bad))
            config_stamp.write_text(key)
        self._make_vmlinux(src)
        return src / "vmlinux"

    def _extract(self, build_root: Path) -> None:
        build_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(KERNEL_SOURCE) as tar, self._progress() as prog:
            task = prog.add_task("extracting linux-source-6.1", total=None)
            for m in tar:
                tar.extract(m, build_root, filter="fully_trusted")
                prog.advance(task)
        if not (build_root / "linux-source-6.1" / "Makefile").exists():
            raise VmrunError(f"{KERNEL_SOURCE}: did not contain linux-source-6.1/Makefile")

    def _make_vmlinux(self, src: Path) -> None:
        cmd = ["make", "ARCH=x86_64", f"-j{self.jobs}", "vmlinux"]
        log_path = src / "vmrun-build.log"
        with self._progress() as prog, open(log_path, "w") as log:
            task = prog.add_task("compiling kernel", total=KERNEL_OBJECTS_ESTIMATE)
            proc = subprocess.Popen(cmd, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=dict(os.environ, ARCH="x86_64"))
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if line.lstrip().startswith(("CC ", "AS ", "LD ", "AR ")):
                    prog.advance(task)
            rc = proc.wait()
            prog.update(task, completed=KERNEL_OBJECTS_ESTIMATE)
        if rc != 0:
            tail = log_path.read_text().splitlines()[-20:]
            raise VmrunError(f"kernel build failed (log: {log_path})", detail="\n".join(tail))

    def _run(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise VmrunError(f"{' '.join(cmd)} failed (exit {res.returncode})",
                             detail=f"{res.stdout[-2000:]}{res.stderr[-2000:]}")

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        TimeElapsedColumn(), console=self.console, transient=False)


# -- initramfs (cpio "newc") -----------------------------------------------
def compile_static(source: Path) -> bytes:
    """Build one C file into a static x86-64 executable (the guest has no libc)."""
    if shutil.which("gcc") is None:
        raise VmrunError("gcc is missing: install the Debian packages gcc and libc6-dev "
                         "(make deps does)")
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / source.stem
        res = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(exe), str(source)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise VmrunError(f"{source.name} did not compile", detail=res.stderr[-2000:])
        return exe.read_bytes()


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1,
                rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> bytes:
    namez = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08x}" for v in (
        ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0))
    out = hdr.encode() + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def busybox_applets(busybox: Path) -> list[str]:
    """Where busybox's applets go (``bin/ls``, ``usr/sbin/httpd``...), as it lists them."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             timeout=30)
    except OSError as e:
        raise VmrunError(f"{busybox}: cannot run it to list its applets: {e.strerror}") \
            from None
    if out.returncode != 0:
        raise VmrunError(f"{busybox} --list-full failed: {out.stderr.strip()[-200:]}")
    return [ln.strip().lstrip("/") for ln in out.stdout.splitlines() if ln.strip()]


def build_initramfs(busybox: Path, init: bytes, extra: dict[str, bytes] | None = None,
                    applets: list[str] | None = None) -> bytes:
    """An uncompressed newc cpio with busybox, a link to it for each of ``applets``, /init
    and the device nodes the kernel needs before devtmpfs is mounted (/dev/console,
    /dev/null)."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "root", "etc", "usr", "usr/bin",
              "usr/sbin"):
        entries.append((d, stat.S_IFDIR | 0o755, b"", (0, 0)))
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes(), (0, 0)))
    entries.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox", (0, 0)))
    entries.append(("init", stat.S_IFREG | 0o755, init, (0, 0)))
    for name, data in (extra or {}).items():
        entries.append((name, stat.S_IFREG | 0o755, data, (0, 0)))
    dirs = {n for n, mode, _, _ in entries if stat.S_ISDIR(mode)}
    taken = {n for n, _, _, _ in entries}
    for name in applets or ():
        if name in taken or "/" in name and name.rsplit("/", 1)[0] not in dirs:
            continue
        taken.add(name)
        entries.append((name, stat.S_IFLNK | 0o777, b"/bin/busybox", (0, 0)))
    raw = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate(entries, start=2):
        raw.write(_cpio_entry(name, mode, data, ino=ino, rdev=rdev,
                              nlink=2 if stat.S_ISDIR(mode) else 1))
    raw.write(_cpio_entry("TRAILER!!!", 0, ino=0))
    return raw.getvalue()
