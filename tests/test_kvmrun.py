"""The compiled KVM_RUN shim (vmrun.core.kvmrun): it builds into the user cache once and is
reused, reports -errno, falls back to the cffi ABI-mode call when it cannot be had, and with
it the vCPU loop still dispatches port exits and still leaves a spinning guest on a kick."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmrun.core import kvmrun
from vmrun.core.exits import ExitCode
from vmrun.testing import RecordingDevice

REPO = Path(__file__).resolve().parent.parent
HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture(autouse=True)
def _fresh_choice():
    kvmrun.reset()
    yield
    kvmrun.reset()


@pytest.fixture(scope="module")
def native():
    """The shim from the real user cache (what the vCPU loop uses). `make deps` installs gcc
    and the build needs Python's headers, which every supported Python has: a failure to
    build is a failure, not a skip (the fallback has tests of its own)."""
    return kvmrun.load_native()


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".build-*")]


def test_shim_builds_once_into_the_cache_and_is_reused(tmp_path: Path) -> None:
    root = tmp_path / "vmrun" / "native"           # cache_root() with XDG_CACHE_HOME=tmp_path
    before = kvmrun.builds
    f = kvmrun.load_native(root)
    assert kvmrun.builds == before + 1
    so = kvmrun._module_file(kvmrun.build_dir(root))
    assert so.is_file() and so.parent.parent == root
    assert so.parent.name.startswith(f"kvmrun-{kvmrun.abi_tag()}-")
    assert _leftovers(tmp_path) == []
    assert f(-1) == -errno.EBADF
    mtime = so.stat().st_mtime_ns

    kvmrun.load_native(root)                        # same process: no rebuild
    assert kvmrun.builds == before + 1
    # A new process with this cache imports the module without compiling it.
    out = subprocess.run(
        [sys.executable, "-c",
         "from vmrun.core import kvmrun; f = kvmrun.kvm_run_function(); "
         "print(kvmrun.builds, f is kvmrun.abi_kvm_run)"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), "VMRUN_NO_NATIVE": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False"]
    assert so.stat().st_mtime_ns == mtime


def test_racing_builds_are_safe(tmp_path: Path) -> None:
    """Two processes building into the same empty cache at once both end up with the shim."""
    code = ("from vmrun.core import kvmrun; f = kvmrun.load_native(); import errno; "
            "assert f(-1) == -errno.EBADF; print('ok')")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.strip() == "ok", err
    built = list((tmp_path / "vmrun" / "native").glob("kvmrun-*/*"))
    assert [p.name for p in built] == [kvmrun._module_file(Path()).name]
    assert _leftovers(tmp_path) == []


def test_errors_come_back_as_minus_errno(native) -> None:
    assert native(-1) == -errno.EBADF
    with open(os.devnull, "rb") as f:               # not a KVM fd: the ioctl is unknown
        assert native(f.fileno()) == -errno.ENOTTY
        assert kvmrun.abi_kvm_run(f.fileno()) == -errno.ENOTTY
    assert kvmrun.abi_kvm_run(-1) == -errno.EBADF


def test_vmrun_no_native_selects_the_abi_call(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMRUN_NO_NATIVE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = kvmrun.builds
    assert kvmrun.native_kvm_run() is None
    assert kvmrun.kvm_run_function() is kvmrun.abi_kvm_run
    assert kvmrun.builds == before and not any(tmp_path.iterdir())


def test_a_failed_build_falls_back_with_one_debug_line(monkeypatch, tmp_path: Path,
                                                       caplog) -> None:
    monkeypatch.delenv("VMRUN_NO_NATIVE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no cc, no gcc anywhere
    with caplog.at_level(logging.DEBUG, logger="vmrun.core.kvmrun"):
        f = kvmrun.kvm_run_function()
        assert kvmrun.kvm_run_function() is f        # decided once
    assert f is kvmrun.abi_kvm_run
    lines = [r for r in caplog.records if r.name == "vmrun.core.kvmrun"]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG, lines
    assert "C compiler" in lines[0].getMessage()
    assert f(-1) == -errno.EBADF
    assert _leftovers(tmp_path) == []


def test_a_broken_compiler_falls_back(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VMRUN_NO_NATIVE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")                # found, but every compile fails
    assert kvmrun.kvm_run_function() is kvmrun.abi_kvm_run
    assert _leftovers(tmp_path) == []
    assert not list(tmp_path.rglob("*.so"))


# -- with KVM ----------------------------------------------------------------------------------
kvm_test = pytest.mark.skipif(not HAVE_KVM, reason="no /dev/kvm")


Recorder = RecordingDevice


@pytest.fixture(params=["native", "abi"])
def kvm_run_path(request, monkeypatch):
    """Make the vCPU loop use the compiled shim, or the fallback."""
    f = request.getfixturevalue("native") if request.param == "native" else None
    monkeypatch.setattr(kvmrun, "_native", f)
    assert kvmrun.native_kvm_run() is f
    return f


@pytest.mark.usefixtures("kvm_run_path")
@pytest.mark.kvm
@kvm_test
def test_port_exits_through_the_shim() -> None:
    from vmrun.testing import guests as g

    code = b"".join(g.report(0x500, v) for v in (1, 0xDEADBEEF, 3)) + g.HLT
    vm = g.long_mode_vm(code)
    dev = Recorder()
    vm.pio.insert(dev, 0x500, 4)
    try:
        vm.start()
        info = vm.wait(20)
        assert info is not None, "guest did not finish"
    finally:
        vm.close()
    assert info.code == ExitCode.HALT, info.reason
    assert dev.writes == [(0, 4, 1), (0, 4, 0xDEADBEEF), (0, 4, 3)]


@pytest.mark.usefixtures("kvm_run_path")
@pytest.mark.kvm
@kvm_test
def test_kick_interrupts_a_spinning_guest() -> None:
    """A guest in `jmp $` never exits by itself; request_exit's kick (immediate_exit + SIGUSR1)
    must get the vCPU thread out of KVM_RUN promptly. Meanwhile this thread keeps running,
    so KVM_RUN does not hold the GIL."""
    from vmrun.testing import guests as g

    vm = g.long_mode_vm(g.JMP_SELF)
    try:
        vm.start()
        spins = 0
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            spins += 1
        thread = vm.vcpus[0].thread
        assert thread is not None and thread.is_alive() and vm.exit_info is None
        assert spins > 1000
        t0 = time.monotonic()
        vm.request_exit(ExitCode.POWER_OFF, "test asked")
        info = vm.wait(10)
        thread.join(5)
        elapsed = time.monotonic() - t0
    finally:
        vm.close()
    assert info is not None and info.code == ExitCode.POWER_OFF
    assert not thread.is_alive()
    assert elapsed < 2.0, elapsed
