"""The runner and the CLI on KVM with synthetic kernels (milliseconds per boot): bhyve's exit
codes, on_reboot, SIGTERM as a power-button press, Ctrl-A x, one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmrun.config import load_machine
from vmrun.core.exits import ExitCode
from vmrun.runner import Runner
from vmrun.testing import kernels

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="no /dev/kvm")


def machine(tmp_path: Path, ending: str, on_reboot: str = "exit", extra: str = "",
            kernel: bytes | None = None) -> Path:
    k = tmp_path / "vmlinux"
    k.write_bytes(kernel if kernel is not None else kernels.pvh_elf(ending))
    f = tmp_path / "m.toml"
    f.write_text(f'name = "t"\ncpus = 1\nmemory = "64M"\non_reboot = "{on_reboot}"\n'
                 f'[boot]\nkernel = "{k}"\n[serial.com1]\nbackend = "null"\n{extra}')
    return f


@pytest.mark.parametrize("ending, code", [
    ("poweroff", ExitCode.POWER_OFF),        # ACPI S5 through PM1a control
    ("reset", ExitCode.RESET),               # 0xCF9
    ("kbd_reset", ExitCode.RESET),           # i8042 pulse
    ("triple_fault", ExitCode.TRIPLE_FAULT),
    ("debug_exit_2", ExitCode.HALT),         # the debug-exit port, value 2
])
def test_guest_endings_map_to_bhyve_exit_codes(tmp_path: Path, ending: str, code: int) -> None:
    info = Runner(load_machine(machine(tmp_path, ending)), log=lambda m: None).run()
    assert info.code == code, info.reason


def test_bzimage_boots_through_the_runner(tmp_path: Path) -> None:
    f = machine(tmp_path, "", kernel=kernels.bzimage("poweroff"))
    info = Runner(load_machine(f), log=lambda m: None).run()
    assert info.code == ExitCode.POWER_OFF


def test_on_reboot_restart_boots_again(tmp_path: Path) -> None:
    runner = Runner(load_machine(machine(tmp_path, "reset", on_reboot="restart")),
                    log=lambda m: None)

    def stop_after_three() -> None:
        while runner.boots < 3:
            time.sleep(0.01)
        runner.quit(ExitCode.POWER_OFF, "test")

    t = threading.Thread(target=stop_after_three)
    t.start()
    info = runner.run()
    t.join()
    assert runner.boots >= 3 and info.code == ExitCode.POWER_OFF


SPIN_PVH = kernels.pvh_elf("poweroff").replace(kernels.ENDINGS_32["poweroff"],
                                               b"\xeb\xfe" + kernels.ENDINGS_32["poweroff"][2:])


def _spawn(f: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmrun", "up", str(f)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_sigterm_presses_the_power_button_then_ends_the_vm(tmp_path: Path) -> None:
    # The synthetic kernel spins and never powers off: after the grace period vmrun ends it.
    f = machine(tmp_path, "", kernel=SPIN_PVH)
    runner = Runner(load_machine(f), log=lambda m: None, grace_s=0.5)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    info = runner.run()
    assert info.code == ExitCode.POWER_OFF
    assert "did not power off" in info.reason


def test_ctrl_a_x_quits_from_the_console(tmp_path: Path) -> None:
    k = tmp_path / "vmlinux"
    k.write_bytes(SPIN_PVH)
    f = tmp_path / "m.toml"
    f.write_text(f'name = "t"\nmemory = "64M"\n[boot]\nkernel = "{k}"\n')
    proc = _spawn(f)
    time.sleep(1.0)
    proc.stdin.write(b"\x01x")
    proc.stdin.flush()
    assert proc.wait(20) == ExitCode.POWER_OFF


def test_serial_input_is_served_on_the_runs_event_loop(tmp_path: Path) -> None:
    # The socket backend is opened on the host context's loop, running before any input.
    sock = tmp_path / "com1.sock"
    k = tmp_path / "vmlinux"
    k.write_bytes(SPIN_PVH)
    f = tmp_path / "m.toml"
    f.write_text(f'name = "t"\nmemory = "64M"\n[boot]\nkernel = "{k}"\n'
                 f'[serial.com1]\nbackend = "socket"\npath = "{sock}"\n')
    runner = Runner(load_machine(f), log=lambda m: None)
    result: list = []
    t = threading.Thread(target=lambda: result.append(runner.run()))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while runner.machine is None or not sock.exists():
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
        uart = runner.machine.uarts["com1"]
        assert runner.host.loop._thread is not None       # started before the backends
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(sock))
            c.sendall(b"hi")
            got = bytearray()
            while len(got) < 2:
                assert time.monotonic() < deadline
                if uart.read(5, 1) & 0x01:          # LSR.DR
                    got.append(uart.read(0, 1))
                else:
                    time.sleep(0.01)
        assert bytes(got) == b"hi"
    finally:
        runner.quit(ExitCode.POWER_OFF, "test")
        t.join(20)
    assert result and result[0].code == ExitCode.POWER_OFF
    assert not sock.exists()                         # closed with the run


def test_bad_machine_file_is_one_red_line_and_exit_4(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('name = "t"\ncpus = 99\n[boot]\nkernel = "nope"\n')
    out = subprocess.run([sys.executable, "-m", "vmrun", "up", str(f)], capture_output=True,
                         text=True)
    assert out.returncode == 4
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cpus: must be between 1 and 16 (got 99)" in lines[0]
    assert str(f) in lines[0]


def test_bad_kernel_image_is_one_line_and_exit_4(tmp_path: Path) -> None:
    f = machine(tmp_path, "", kernel=b"not a kernel at all" * 50)
    out = subprocess.run([sys.executable, "-m", "vmrun", "up", str(f)], capture_output=True,
                         text=True)
    assert out.returncode == 4
    assert "not a Linux kernel" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_an_image_created_for_a_machine_that_fails_to_come_up_is_removed(
        tmp_path: Path) -> None:
    """One device creates its image (size=), a later one cannot open its own (locked by
    another user): the VM never runs, and the new image does not stay behind."""
    from vmrun.block import RawFile
    from vmrun.errors import VmrunError
    from vmrun.machine import Machine

    busy = tmp_path / "busy.img"
    busy.write_bytes(bytes(1 << 20))
    new = tmp_path / "new.img"
    extra = (f'[devices.a]\nmodel = "virtio-blk"\npath = "{new}"\nsize = "1M"\n'
             f'[devices.b]\nmodel = "virtio-blk"\npath = "{busy}"\n')
    cfg = load_machine(machine(tmp_path, "poweroff", extra=extra))
    with RawFile(busy):                                   # holds the write lock
        with pytest.raises(VmrunError, match="in use"):
            Machine(cfg, {})
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.img", "m.toml", "vmlinux"]


def test_an_error_after_a_half_line_of_guest_output_starts_its_own_line(tmp_path: Path) -> None:
    """The guest's console and vmrun's messages share the terminal: the guest left "half"
    without a newline, and the triple-fault line must not be glued to it."""
    import pty

    f = machine(tmp_path, "half_line_triple_fault")
    f.write_text(f.read_text().replace('backend = "null"', 'backend = "stdio"'))
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vmrun", "up", str(f)],
                                stdin=slave, stdout=slave, stderr=slave,
                                cwd=Path(__file__).resolve().parents[1])
        os.close(slave)
        slave = -1
        got = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        assert proc.wait(timeout=30) == ExitCode.TRIPLE_FAULT
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = got.decode(errors="replace").replace("\r", "")
    assert "half\n" in text, text
    line = next(ln for ln in text.splitlines() if "triple fault" in ln)
    assert line.lstrip("\x1b[0123456789;m").startswith("vmrun: "), text
