"""KVM_RUN through a tiny compiled shim (cffi API mode), with the ABI-mode call as fallback.

The vCPU loop calls KVM_RUN once per exit. Through cffi's ABI mode (``libc.ioctl`` from
:mod:`vmrun.core.kvm`) that call costs about 1 µs of Python-side work (variadic call set-up,
argument conversion, saving errno); an API-mode function with a fixed C signature costs a
fraction of that. The shim is one C function, ``int vmrun_kvm_run(int fd)``: the ioctl's result,
or ``-errno`` on failure, so Python needs no ``ffi.errno`` look-up. Like every API-mode call it
releases the GIL, so the rest of the VMM runs while a vCPU is in the guest.

It is compiled on first use (well under a second, once per machine and Python) into the user's
cache, ``$XDG_CACHE_HOME/vmrun/native/kvmrun-<python ABI>-<hash>/`` (default ``~/.cache``),
never inside the repository. The C file cffi generates (as ``ffi.emit_c_code`` would) goes
straight to the C compiler in a subprocess rather than through ``ffi.compile``, which changes
the whole process's working directory while it builds (not safe with VM threads running) and
pulls in setuptools. Each build happens in a private temporary directory and the module is
moved into place with an atomic rename, so processes racing to build it are safe. Without a
compiler or Python headers, with ``VMRUN_NO_NATIVE=1``, or on any failure,
:func:`native_kvm_run` returns None (the vCPU loop then makes the ABI-mode call as before),
after one debug log line; :func:`kvm_run_function` gives either behind one contract.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import cffi
from cffi import recompiler

from vmrun.core import kvm

log = logging.getLogger(__name__)

MODULE = "_vmrun_kvmrun"
CDEF = "int vmrun_kvm_run(int fd);"
SOURCE = f"""
#include <errno.h>
#include <sys/ioctl.h>

/* KVM_RUN is _IO(KVMIO, 0x80); the number comes from vmrun.core.kvm (checked against
   <linux/kvm.h> by tests/test_kvm_abi.py), so no kernel headers are needed here. */
static int vmrun_kvm_run(int fd)
{{
    int r = ioctl(fd, {kvm.KVM_RUN:#x}UL, 0UL);
    return r < 0 ? -errno : r;
}}
"""

# How many times this process compiled the shim (the tests check that a cached one is reused).
builds = 0
_lock = threading.Lock()
_UNSET = object()
_native = _UNSET       # the compiled function, None (not available), or _UNSET (not decided)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmrun" / "native"


def abi_tag() -> str:
    """The extension ABI this interpreter loads, e.g. ``cpython-311-x86_64-linux-gnu``."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]          # .cpython-311-x86_64-...so
    return suffix.removesuffix(".so").strip(".") or sys.implementation.cache_tag


def build_dir(root: Path | None = None) -> Path:
    """Where this interpreter's build of this source lives."""
    h = hashlib.sha256(f"{CDEF}\n{SOURCE}\ncffi {cffi.__version__}".encode()).hexdigest()[:16]
    return (root or cache_root()) / f"kvmrun-{abi_tag()}-{h}"


def _module_file(directory: Path) -> Path:
    return directory / (MODULE + importlib.machinery.EXTENSION_SUFFIXES[0])


def _ffi() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, SOURCE)
    return ffi


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    argv = shlex.split(cc)
    if not argv or shutil.which(argv[0]) is None:
        argv = ["cc"]
    if shutil.which(argv[0]) is None:
        raise RuntimeError("no C compiler found")
    return argv


def _compile(target: Path) -> None:
    """Build the module into ``target`` (a file path): in a private temporary directory next
    to it, then one atomic rename."""
    global builds
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        raise RuntimeError(f"no Python headers ({include}/Python.h)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        c_file = tmp / f"{MODULE}.c"
        # ffi.emit_c_code, without its "generating ..." line on stdout
        recompiler.make_c_source(_ffi(), MODULE, SOURCE, str(c_file), verbose=False)
        out = tmp / target.name
        cmd = [*_compiler(), "-shared", "-fPIC", "-O2", "-w", f"-I{include}",
               "-o", str(out), str(c_file)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
        builds += 1
        os.replace(out, target)                 # atomic; a racing process's copy is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_native(root: Path | None = None) -> Callable[[int], int]:
    """The compiled ``vmrun_kvm_run``, building it first if the cache lacks it. Raises on any
    failure (callers wanting the fallback use :func:`kvm_run_function`)."""
    path = _module_file(build_dir(root))
    if not path.exists():
        _compile(path)
    return _import(path).lib.vmrun_kvm_run


def abi_kvm_run(fd: int, _ioctl=kvm.libc.ioctl, _req=kvm.KVM_RUN,
                _zero=kvm.ffi.cast("unsigned long", 0), _ffi=kvm.ffi) -> int:
    """The fallback, with the shim's contract: the ioctl's result, or -errno."""
    r = _ioctl(fd, _req, _zero)
    return r if r >= 0 else -_ffi.errno


def native_disabled() -> bool:
    return os.environ.get("VMRUN_NO_NATIVE", "") not in ("", "0")


def native_kvm_run() -> Callable[[int], int] | None:
    """The compiled shim, built and cached on first use; None where it cannot be had (then
    one debug line says why). Decided once per process."""
    global _native
    if _native is not _UNSET:
        return _native
    with _lock:
        if _native is _UNSET:
            if native_disabled():
                log.debug("KVM_RUN: VMRUN_NO_NATIVE is set; using the cffi ABI-mode call")
                _native = None
            else:
                try:
                    _native = load_native()
                except Exception as e:  # no compiler, no headers, read-only cache, ...
                    log.debug("KVM_RUN: no compiled shim (%s); using the cffi ABI-mode call", e)
                    _native = None
        return _native


def kvm_run_function() -> Callable[[int], int]:
    """``f(fd) -> int``: KVM_RUN on ``fd``, returning its result or -errno: the compiled shim
    when it can be had, else :func:`abi_kvm_run`."""
    return native_kvm_run() or abi_kvm_run


def reset() -> None:
    """Forget the decision (for tests)."""
    global _native
    with _lock:
        _native = _UNSET
