"""Snapshots: the device state contract (plain-data fields, versions), the KVM state through
KVM's ioctls on a tiny guest, and ``vmrun snapshot`` / ``vmrun up --restore`` of the console
guest (:func:`vmrun.testing.kernels.console_pvh`), checked from the host: the restored guest
answers on its console without printing its boot banner again (it continued, it did not
boot), and a machine that does not match, or a device that cannot be saved, is one line."""

from __future__ import annotations

import base64
import os
import select
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrun import instances
from vmrun.core.devstate import PlainState, SnapshotUnsupported, decode, encode
from vmrun.devices.rtc import CmosRtc
from vmrun.devices.uart import Uart16550
from vmrun.testing import kernels

KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
kvm_only = pytest.mark.skipif(not KVM, reason="no /dev/kvm")

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8)
    | st.binary(max_size=8).map(bytearray) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
    | st.lists(inner, max_size=4).map(deque), max_leaves=12)


@given(plain)
def test_encode_decode_keeps_values_and_types(value) -> None:
    import json

    back = decode(json.loads(json.dumps(encode(value))))
    assert back == value and type(back) is type(value)


class Line:
    def __init__(self) -> None:
        self.level = False

    def set_level(self, level: bool) -> None:
        self.level = level


def test_uart_state_round_trip() -> None:
    a = Uart16550(Line(), lambda data: None)
    a.write(3, 1, 0x83)                       # DLAB on
    a.write(0, 1, 0x01)
    a.write(3, 1, 0x03)                       # 8N1
    a.write(7, 1, 0x5A)                       # scratch
    a.write(2, 1, 0xC7)                       # FIFOs on
    a.feed(b"hi")
    state = a.save_state()
    b = Uart16550(Line(), lambda data: None)
    b.load_state(state)
    for reg in (3, 7, 5):
        assert b.read(reg, 1) == a.read(reg, 1)
    assert bytes([b.read(0, 1), b.read(0, 1)]) == b"hi"


def test_rtc_state_round_trip_and_version_check() -> None:
    a = CmosRtc(Line())
    a.write(0, 1, 0x40)
    a.write(1, 1, 0x99)                       # a CMOS RAM byte
    b = CmosRtc(Line())
    b.load_state(a.save_state())
    b.write(0, 1, 0x40)
    assert b.read(1, 1) == 0x99
    bad = a.save_state()
    bad["version"] = 99
    with pytest.raises(ValueError, match="state version 99"):
        b.load_state(bad)


def test_a_device_without_state_support_refuses() -> None:
    from vmrun.core.pci import PciDevice

    class Opaque(PciDevice):
        name = "opaque"

    with pytest.raises(SnapshotUnsupported, match="opaque: this device cannot be"):
        Opaque().device_state()

    class Regs(PlainState):
        def __init__(self) -> None:
            self.a, self.b, self.callback = 1, bytearray(b"xy"), print

    r = Regs()
    assert set(r.save_state()["fields"]) == {"a", "b"}        # objects are never state


@kvm_only
def test_kvm_state_moves_a_running_guest_to_a_new_vm() -> None:
    from vmrun.core.exits import ExitCode
    from vmrun.core.kvmstate import KvmState
    from vmrun.testing import guests as g

    counter = 0x50000
    code = b"\xff\x04\x25" + counter.to_bytes(4, "little") + b"\xeb\xf7"  # inc [c]; jmp
    vm = g.long_mode_vm(code, irqchip=True)
    try:
        vm.start()
        time.sleep(0.3)
        assert vm.pause()
        saver = KvmState()
        state = saver.save(vm)
        ram = bytes(vm.memory.read(0, g.MEMORY))
        saved = int.from_bytes(vm.memory.read(counter, 4), "little")
        vm.request_exit(ExitCode.POWER_OFF, "saved")
        vm.wait(10)
    finally:
        vm.close()
    assert saved > 0 and len(state["vcpus"][0]["msrs"]) > 10
    vm2 = g.long_mode_vm(g.HLT, irqchip=True)        # would halt at once if not restored
    try:
        vm2.memory.write(0, ram)
        time.sleep(0.2)     # where the host ignores the TSC write, it has run on meanwhile
        loader = KvmState()
        loader.restore(vm2, state)
        vm2.start()
        time.sleep(0.3)
        assert vm2.exit_info is None                  # still running: the loop, not hlt
        assert int.from_bytes(vm2.memory.read(counter, 4), "little") > saved
        # What this host's KVM refused is recorded: nothing, but for the TSC where the
        # host ignores a write of it (kvm-pvm).
        assert saver.refused == []
        tsc = [r for r in loader.refused if "TSC" in r]
        assert loader.refused == tsc and len(tsc) == (1 if tsc_write_ignored() else 0)
        vm2.request_exit(ExitCode.POWER_OFF, "done")
        vm2.wait(10)
    finally:
        vm2.close()


def tsc_write_ignored() -> bool:
    """Does this host's KVM leave the guest TSC alone when the VMM writes it (kvm-pvm)?"""
    from vmrun.core.vm import Vm

    vm = Vm(4 << 20, 1)
    try:
        vm.vcpus[0].set_msrs({0x10: 1 << 40})
        return not 0 <= vm.vcpus[0].get_msr(0x10) - (1 << 40) < 50_000_000
    finally:
        vm.close()


@kvm_only
def test_a_pending_tsc_deadline_timer_survives_the_restore() -> None:
    """KVM_SET_LAPIC cancels the LAPIC timer: the TSC deadline is put back after it (a
    tickless or TSC-deadline guest restored without it waits for an interrupt for good)."""
    import struct

    from vmrun.core.kvmstate import KvmState
    from vmrun.testing import guests as g

    vm = g.long_mode_vm(g.HLT, irqchip=True)
    try:
        state = KvmState().save(vm)
        deadline = vm.vcpus[0].get_msr(0x10) + (1 << 42)        # far ahead: never fires
    finally:
        vm.close()
    vstate = state["vcpus"][0]
    lapic = bytearray(base64.b64decode(vstate["lapic"]))
    struct.pack_into("<I", lapic, 0xF0, struct.unpack_from("<I", lapic, 0xF0)[0] | 0x1FF)
    struct.pack_into("<I", lapic, 0x320, 0x400EC)                # LVTT: TSC-deadline mode
    vstate["lapic"] = base64.b64encode(lapic).decode()
    vstate["msrs"]["0x6e0"] = deadline
    vm2 = g.long_mode_vm(g.HLT, irqchip=True)
    try:
        KvmState().restore(vm2, state)
        assert vm2.vcpus[0].get_msr(0x6E0) == deadline
    finally:
        vm2.close()


def vmrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmrun", *args], capture_output=True,
                          text=True, timeout=timeout)


def machine(tmp_path: Path, name: str, extra: str = "", memory: str = "64M") -> Path:
    k = tmp_path / "k"
    k.write_bytes(kernels.console_pvh())
    f = tmp_path / f"{name}-{memory}.toml"
    f.write_text(f'name = "{name}"\nmemory = "{memory}"\n[boot]\nkernel = "{k}"\n'
                 f'[serial.com1]\nbackend = "stdio"\n{extra}')
    return f


def pty_exchange(path: str, send: bytes, want: bytes, timeout: float = 20) -> bytes:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    data = b""
    try:
        os.write(fd, send)
        end = time.monotonic() + timeout
        while want not in data and time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                data += os.read(fd, 4096)
        time.sleep(0.3)
        r, _, _ = select.select([fd], [], [], 0)
        if r:
            data += os.read(fd, 4096)
    finally:
        os.close(fd)
    return data


@kvm_only
def test_snapshot_and_restore_through_the_cli(tmp_path: Path) -> None:
    f = machine(tmp_path, "snap1")
    assert vmrun("up", "-d", "--console", "pty", str(f)).returncode == 0
    try:
        vm = instances.find("snap1")
        fresh = pty_exchange(vm.console[4:], b"ab", b"AB")
        assert kernels.CONSOLE_BANNER in fresh and b"AB" in fresh     # a boot prints it
        snap = tmp_path / "s.snap"
        out = vmrun("snapshot", "snap1", str(snap))
        assert out.returncode == 0, out.stderr
        assert out.stderr.count("\n") == 1 and "saved to" in out.stderr
        ram = Path(f"{snap}.ram")
        assert ram.stat().st_size == 64 << 20
        assert ram.stat().st_blocks * 512 < 8 << 20                  # sparse where zero
        assert pty_exchange(vm.console[4:], b"x", b"X").endswith(b"X")  # it runs on
    finally:
        vmrun("kill", "snap1")
    # A machine that does not match: one line, exit 4, nothing started.
    other = machine(tmp_path, "snap1", memory="128M")
    bad = vmrun("up", "-d", "--restore", str(snap), str(other))
    assert bad.returncode == 4 and bad.stderr.count("\n") == 1
    assert "another machine: memory is 67108864" in bad.stderr
    junk = tmp_path / "junk.snap"
    junk.write_text("{}")
    bad = vmrun("up", "--restore", str(junk), str(f))
    assert bad.returncode == 4 and "not a vmrun snapshot" in bad.stderr
    # Taken on another CPU (here: its header says leaf 7's feature bits differ): refused.
    import json

    header = json.loads(snap.read_text())
    header["machine"]["cpu"]["0x7.0"][1] ^= 1 << 5
    moved = tmp_path / "moved.snap"
    moved.write_text(json.dumps(header))
    Path(f"{moved}.ram").symlink_to(Path(f"{snap}.ram"))
    bad = vmrun("up", "--restore", str(moved), str(f))
    assert bad.returncode == 4 and bad.stderr.count("\n") == 1, bad.stderr
    assert "taken on another CPU" in bad.stderr and "CPUID leaf 0x7.0" in bad.stderr
    # The restore continues where the guest was: no banner, the echo answers at once.
    t0 = time.monotonic()
    out = vmrun("up", "-d", "--console", "pty", "--restore", str(snap), str(f))
    assert out.returncode == 0, out.stderr
    try:
        vm = instances.find("snap1")
        got = pty_exchange(vm.console[4:], b"cd", b"CD")
        assert got == b"CD", got
        assert time.monotonic() - t0 < 20
        stop = vmrun("stop", "snap1")                 # the power button works after restore
        assert stop.returncode == 0 and "powered off" in stop.stderr
    finally:
        vmrun("kill", "snap1")


@kvm_only
def test_a_machine_with_virtio_devices_snapshots_and_restores(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    f = machine(tmp_path, "snap2", extra=f'[devices.rng]\nmodel = "virtio-rnd"\n'
                f'[devices.disk]\nmodel = "virtio-blk"\npath = "{disk}"\n')
    assert vmrun("up", "-d", str(f)).returncode == 0
    try:
        out = vmrun("snapshot", "snap2", str(tmp_path / "s.snap"))
        assert out.returncode == 0 and out.stderr.count("\n") == 1, out.stderr
    finally:
        vmrun("kill", "snap2")
    out = vmrun("up", "-d", "--console", "pty", "--restore", str(tmp_path / "s.snap"), str(f))
    assert out.returncode == 0, out.stderr
    try:
        vm = instances.find("snap2")
        assert pty_exchange(vm.console[4:], b"ok", b"OK") == b"OK"
    finally:
        vmrun("kill", "snap2")
    # Another device layout is another machine: one line, exit 4.
    f.write_text(f.read_text().replace('[devices.rng]\nmodel = "virtio-rnd"\n', ""))
    bad = vmrun("up", "--restore", str(tmp_path / "s.snap"), str(f))
    assert bad.returncode == 4 and bad.stderr.count("\n") == 1
    assert "another machine: pci is" in bad.stderr, bad.stderr


def every_device_machine(tmp_path: Path, name: str) -> Path:
    """A machine with every device plugin: virtio-net and e1000 (socket backends), AHCI disk
    and CD, the fbuf display, the xHCI controller with a tablet and a keyboard."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    iso = tmp_path / "c.iso"
    iso.write_bytes(bytes(2048 * 16))
    extra = (f'[devices.net]\nmodel = "virtio-net"\nbackend = "socket"\n'
             f'listen = "{tmp_path}/n1.sock"\n'
             f'[devices.nic]\nmodel = "e1000"\nbackend = "socket"\nlisten = "{tmp_path}/n2.sock"\n'
             f'[devices.hd]\nmodel = "ahci-hd"\npath = "{disk}"\n'
             f'[devices.cd]\nmodel = "ahci-cd"\npath = "{iso}"\n'
             f'[devices.fb]\nmodel = "fbuf"\nlisten = "127.0.0.1:0"\n'
             f'[devices.usb]\nmodel = "xhci"\ndevices = ["tablet", "keyboard"]\n')
    return machine(tmp_path, name, extra=extra)


def save_running(f: Path, name: str, snap: Path) -> Path:
    """Start machine file ``f`` in the background, snapshot it to ``snap`` (one line, exit
    0), kill it."""
    out = vmrun("up", "-d", str(f))
    assert out.returncode == 0, out.stderr
    try:
        out = vmrun("snapshot", name, str(snap))
        assert out.returncode == 0 and out.stderr.count("\n") == 1, out.stderr
    finally:
        vmrun("kill", name)
    return snap


@kvm_only
def test_a_machine_with_every_device_plugin_snapshots_and_restores(tmp_path: Path) -> None:
    """Every device plugin saved (the RAM file also holds the 16 MiB framebuffer after guest
    RAM) and restored; the guest answers on its console."""
    f = every_device_machine(tmp_path, "snap3")
    snap = save_running(f, "snap3", tmp_path / "s.snap")
    assert Path(f"{snap}.ram").stat().st_size == (64 << 20) + (16 << 20)
    out = vmrun("up", "-d", "--console", "pty", "--restore", str(snap), str(f))
    assert out.returncode == 0, out.stderr
    try:
        vm = instances.find("snap3")
        assert pty_exchange(vm.console[4:], b"ok", b"OK") == b"OK"
    finally:
        vmrun("kill", "snap3")


@pytest.fixture(scope="module")
def saved_every_device(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The every-device machine saved once: (machine file, snapshot, its parsed header)."""
    import json

    if not KVM:
        pytest.skip("no /dev/kvm")
    d = tmp_path_factory.mktemp("fuzzsnap")
    f = every_device_machine(d, "snapfuzz")
    snap = save_running(f, "snapfuzz", d / "s.snap")
    return _Saved(f, snap, json.loads(snap.read_text()))


class _Saved(tuple):
    """(machine file, snapshot, header) with a short repr (hypothesis prints its input)."""

    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self) -> str:
        return f"<saved {self[1]}>"


def _leaves(node, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))


_junk = (st.integers(-(1 << 70), 1 << 70) | st.sampled_from([-1, 0, 1 << 32, 1 << 64, 65536])
         | st.text(max_size=6) | st.none() | st.booleans() | st.floats(allow_nan=False)
         | st.lists(st.integers(-1, 300), max_size=4) | st.just({}) | st.just({"b64": "!!"})
         | st.just({"b64": 3}) | st.just({"deque": 1}) | st.just({"a": 1, "b": 2}))


@kvm_only
@settings(max_examples=int(os.environ.get("VMRUN_FUZZ_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_damaged_snapshot_is_one_error_or_restores(saved_every_device, data) -> None:
    """A snapshot file is input: any one value of it replaced (or a key deleted) by junk is
    either restored or refused with one VmrunError, never another exception from vmrun."""
    import json
    import tempfile

    from vmrun.chardev import NullBackend
    from vmrun.config import load_machine
    from vmrun.core.host import HostContext
    from vmrun.errors import VmrunError
    from vmrun.machine import Machine
    from vmrun.snapshot import restore

    f, snap, header = saved_every_device
    header = json.loads(json.dumps(header))
    # A part first (the machine's identity, a device: PCI functions by slot, the UART...),
    # then a value in it: the e1000's register file alone has 32 768 leaves.
    parts: dict[tuple, list[tuple]] = {}
    for p, _ in _leaves(header):
        if p and p[0] in ("state", "machine"):
            parts.setdefault(p[:3] if p[:2] == ("state", "pci") else p[:2], []).append(p)
    part = data.draw(st.sampled_from(sorted(parts, key=str)), label="part")
    where = data.draw(st.sampled_from(parts[part]), label="path")
    parent = header
    for k in where[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(_junk, label="value")
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.snap"
        bad.write_text(json.dumps(header))
        os.symlink(f"{snap}.ram", f"{bad}.ram")
        cfg = load_machine(f)
        host = HostContext()
        host.start()
        m = Machine(cfg, {"com1": NullBackend(host.loop)}, host=host)
        try:
            restore(cfg, m, bad)
        except VmrunError as e:
            assert "\n" not in str(e)
        else:
            try:                    # what it took is state the devices can work with: a
                m.save_state()      # device it left stuck may refuse, in one line
            except VmrunError as e:
                assert "\n" not in str(e)
        finally:
            m.close()
            host.close()


def test_virtio_rnd_state_moves_to_a_fresh_transport() -> None:
    """A driven virtio-rnd (MSI-X on, a request served) saved, then loaded into a fresh
    function on a fresh machine with the same RAM: the MSI-X table and its KVM routes are
    back, and the next request is served at the next used-ring slot."""
    from vmrun.core.virtio.pci import VirtioPciTransport
    from vmrun.devices.virtio_rnd import VirtioRng
    from vmrun.testing import FakeVm, VirtioDriver

    a = FakeVm()
    b = FakeVm()
    try:
        ta = VirtioPciTransport(VirtioRng())
        a.pci.add(ta, 5)
        a.pci.assign_bars()
        drv = VirtioDriver(a, 5)
        drv.setup()
        q = drv.queues[0]
        head, _ = q.add([], [32])
        drv.kick(0)
        assert q.get_used() == [(head, 32)]
        state = a.pci.save_state()
        b.memory.write(0, a.memory.read(0, a.memory.size))
        tb = VirtioPciTransport(VirtioRng())
        b.pci.add(tb, 5)
        b.pci.assign_bars()
        b.pci.load_state(state)
        b.sync()
        assert tb.active and tb.queues[0].next_used == 1
        # The driver, unaware of the move, goes on with the same rings (now in b's RAM).
        q.mem = b.memory
        drv2 = VirtioDriver(b, 5)
        drv2.queues = [q]
        head2, (buf,) = q.add([], [16])
        drv2.kick(0)
        assert q.get_used() == [(head2, 16)]
        assert tb.msix.entry(1) == ta.msix.entry(1) and tb.msix.enabled
        assert b.msi_routes[tb.msix.gsis[1]] == a.msi_routes[ta.msix.gsis[1]]
    finally:
        a.close()
        b.close()


def test_a_held_loop_runs_nothing_but_what_the_holder_syncs() -> None:
    """While a snapshot holds the devices' loop no callback of its own runs (the state and
    RAM read meanwhile agree); the holder's sync() runs the calls queued meanwhile (a
    disk's completions); the rest runs once the loop is let go."""
    import threading

    from vmrun.core.eventloop import EventLoop

    loop = EventLoop("held-test")
    loop.start()
    try:
        ran: list[str] = []
        timer = loop.timer(lambda: ran.append("timer"))
        with loop.held():
            timer.arm(0.01)
            time.sleep(0.1)
            assert ran == []                          # the timer's fd is not served
            threading.Thread(target=lambda: loop.call_soon(ran.append, "done")).start()
            time.sleep(0.05)
            assert loop.sync() and ran == ["done"]    # run by the holder itself
        assert loop.sync()
        time.sleep(0.05)
        assert ran == ["done", "timer"]
        timer.close()
    finally:
        loop.close()


def test_ram_bars_go_into_the_ram_file_after_guest_ram(tmp_path: Path) -> None:
    """Every RAM BAR of the machine's PCI functions is saved after the RAM slots (sparse)
    and read back into a fresh machine's BARs; a RAM file of another size is refused."""
    from types import SimpleNamespace

    from vmrun import snapshot
    from vmrun.core.pci import BarSpec, PciDevice
    from vmrun.errors import VmrunError
    from vmrun.testing import FakeVm

    class Fb(PciDevice):
        name = "fb"
        bars = [BarSpec(0, 1 << 16, ram=True), BarSpec(2, 4096)]

    def build() -> tuple[FakeVm, PciDevice]:
        vm = FakeVm(memory=1 << 20)
        dev = Fb()
        vm.pci.add(dev, 3)
        vm.pci.assign_bars()
        return vm, dev

    a, fa = build()
    b, fb = build()
    try:
        a.memory.write(0x1000, b"guest ram")
        fa.ram_bars[0].view[0x8000:0x8005] = b"pixel"
        f = tmp_path / "s.ram"
        written = snapshot._write_ram(SimpleNamespace(vm=a, pci=a.pci), f)
        assert f.stat().st_size == (1 << 20) + (1 << 16) and written == snapshot.CHUNK + (1 << 16)
        snapshot._read_ram(SimpleNamespace(vm=b, pci=b.pci), f)
        assert b.memory.read(0x1000, 9) == b"guest ram"
        assert bytes(fb.ram_bars[0].view[0x8000:0x8005]) == b"pixel"
        os.truncate(f, 1 << 20)
        with pytest.raises(VmrunError, match="the machine has .* \\(RAM and RAM BARs\\)"):
            snapshot._read_ram(SimpleNamespace(vm=b, pci=b.pci), f)
    finally:
        a.close()
        b.close()
