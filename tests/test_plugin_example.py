"""The README's example device plugin (tests/plugin_example, ``pci-echo``), loaded as an
installed third-party distribution, listed by ``vmrun devices`` and driven like a guest driver
would: registers, MSI-X, a DMA copy behind a doorbell, bus mastering, a fault.

The README's code blocks are checked against the distribution's files, and the README's own
test snippet is run, so the documentation cannot drift from code that works.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import vmrun.plugins
from vmrun.core.host import HostContext
from vmrun.core.pci import CAP_ID_MSIX, COMMAND
from vmrun.plugins import build_registry
from vmrun.plugins.registry import DeviceContext, validate_options
from vmrun.testing import FakeVm, PciDriver

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "tests" / "plugin_example"
PLUGIN = EXAMPLE / "vmrun_pci_echo" / "plugin.py"
SLOT = 5
SRC_BUF, DST_BUF = 0x10000, 0x20000


# -- the distribution, installed without pip ---------------------------------------------
@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Copy the package to a directory on sys.path next to a dist-info written from the
    example's pyproject.toml, as pip would leave it; forget the module afterwards."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copytree(EXAMPLE / "vmrun_pci_echo", tmp_path / "vmrun_pci_echo")
    info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in project["entry-points"]["vmrun"].items())
    (info / "entry_points.txt").write_text(f"[vmrun]\n{eps}")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "vmrun_pci_echo"]:
        monkeypatch.delitem(sys.modules, name)
    yield project
    for name in [m for m in sys.modules if m.split(".")[0] == "vmrun_pci_echo"]:
        del sys.modules[name]


def test_pyproject_announces_the_plugin() -> None:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "vmrun-pci-echo"
    assert project["entry-points"]["vmrun"] == {"pci_echo": "vmrun_pci_echo.plugin"}


def test_entry_point_is_found(installed: dict) -> None:
    import importlib.metadata

    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="vmrun")}
    assert eps["pci_echo"].value == "vmrun_pci_echo.plugin"
    assert eps["pci_echo"].dist.metadata["name"] == "vmrun-pci-echo"


def test_registry_lists_it_with_its_distribution(installed: dict) -> None:
    reg = build_registry()
    assert "pci_echo" not in reg.broken
    echo = reg.devices["pci-echo"]
    assert (echo.plugin, echo.version) == ("vmrun-pci-echo", installed["version"])
    assert [o.name for o in echo.options] == ["max_len", "scratch"]


def test_vmrun_devices_lists_it(installed: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmrun.cli import main

    monkeypatch.setattr(vmrun.plugins, "_registry", None)   # discover again, with the example
    runner = CliRunner(env={"COLUMNS": "200"})
    out = runner.invoke(main, ["devices"])
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if "pci-echo" in ln)
    assert "vmrun-pci-echo" in line and installed["version"] in line
    out = runner.invoke(main, ["devices", "pci-echo"])
    assert out.exit_code == 0, out.output
    assert "max_len" in out.output and "largest copy" in out.output


# -- the plugin imports only the plugin API -----------------------------------------------
def test_plugin_imports_only_vmrun_api() -> None:
    for path in sorted((EXAMPLE / "vmrun_pci_echo").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name == "vmrun" or name.startswith("vmrun."):
                    assert name == "vmrun.api", f"{path.name} imports {name}"


# -- the README shows this very code ------------------------------------------------------
def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Writing a device plugin")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", readme_section(), re.S | re.M)


def test_readme_device_code_is_the_plugin_file() -> None:
    device = next(b for b in code_blocks("python") if "class PciEcho" in b)
    source = PLUGIN.read_text()
    # All of plugin.py but its module docstring (the README describes the registers).
    assert device == source[source.index("from __future__"):], \
        "README's pci-echo code differs from tests/plugin_example/vmrun_pci_echo/plugin.py"
    for needle in ("from vmrun.api import", "class PciEcho(PciDevice)", "def bar_write",
                   "self.loop.call_soon(self.ring, owner=self)", "self.add_doorbell(",
                   "self.dma.sg(", "self.irq.trigger(0)", "def fault", "ctx.host_resource(",
                   "@hookimpl", "\"pci-echo\", "):
        assert needle in device, needle


def test_readme_entry_point_is_the_pyproject_one() -> None:
    (toml,) = code_blocks("toml")
    assert toml in (EXAMPLE / "pyproject.toml").read_text()
    assert "[project.entry-points.vmrun]" in toml


def test_readme_test_snippet_runs(installed: dict) -> None:
    snippet = next(b for b in code_blocks("python") if "FakeVm" in b)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    tests = [f for name, f in scope.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()


# -- the device on a fake VM, placed through its factory ----------------------------------
class Echo:
    """The device placed as the machine places it, and a driver's view of it."""

    def __init__(self, vm: FakeVm, table: dict | None = None, device_id: str = "echo0",
                 host: HostContext | None = None, slot: int = SLOT) -> None:
        dtype = build_registry().devices["pci-echo"]
        opts = validate_options(dtype, table or {}, REPO)
        ctx = DeviceContext(device_id, "t", str(uuid.uuid4()), host or vm.host, REPO, slot, 0)
        self.dev = dtype.factory(ctx, opts)
        self.vm, self.slot = vm, slot
        vm.pci.add(self.dev, slot)
        vm.pci.assign_bars()          # as firmware: BARs placed, decoding and bus mastering on
        self.pci = PciDriver(vm)
        assert self.pci.scan()[(slot, 0)] == (0x1234, 0xEC40)
        self.regs = self.pci.bar_address(slot, 0, 0)

    def read(self, offset: int) -> int:
        return self.vm.mmio.read(self.regs + offset, 4)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.vm.mmio.write(self.regs + offset, size, value)

    def enable_msix(self, data: int = 0x41) -> int:
        """Program and unmask vector 0 through the table the MSI-X capability points at;
        returns the vector's GSI (the route whose message is ours)."""
        caps = dict((cap_id, off) for off, cap_id in self.pci.capabilities(self.slot, 0))
        cap = caps[CAP_ID_MSIX]
        ctrl = self.pci.read(self.slot, 0, cap + 2, 2)
        assert ctrl & 0x7FF == 0                              # one vector
        table = self.pci.read(self.slot, 0, cap + 4)
        bir, offset = table & 7, table & ~7
        assert bir != 0                                       # not in the device's BAR 0
        base = self.pci.bar_address(self.slot, 0, bir) + offset
        self.pci.write(self.slot, 0, cap + 2, 2, ctrl | 0x8000)   # enable
        self.vm.mmio.write(base, 4, 0xFEE00000)
        self.vm.mmio.write(base + 4, 4, 0)
        self.vm.mmio.write(base + 8, 4, data)
        self.vm.mmio.write(base + 12, 4, 0)                   # unmask
        (gsi,) = [g for g, (_a, d) in self.vm.msi_routes.items() if d == data]
        return gsi

    def copy(self, src: int, dst: int, n: int) -> None:
        self.write(0x08, src & 0xFFFFFFFF)
        self.write(0x0C, src >> 32)
        self.write(0x10, dst, size=8)
        self.write(0x18, n)
        self.write(0x28, 1)          # the doorbell: handed to the event loop
        self.vm.sync()               # let the loop do the copy

    def master(self, on: bool) -> None:
        cmd = self.pci.read(self.slot, 0, COMMAND, 2)
        self.pci.write(self.slot, 0, COMMAND, 2, cmd | 4 if on else cmd & ~4)


@pytest.fixture
def vm(installed: dict):
    v = FakeVm()
    yield v
    v.close()


def test_registers_and_options(vm: FakeVm) -> None:
    e = Echo(vm, {"scratch": 0x1234, "max_len": "1K"})
    assert e.read(0x00).to_bytes(4, "little") == b"echo"
    assert e.read(0x04) == 0x1234
    e.write(0x04, 0xDEADBEEF)
    e.write(0x00, 0)                                  # ID is read-only
    assert (e.read(0x00), e.read(0x04)) == (int.from_bytes(b"echo", "little"), 0xDEADBEEF)
    assert e.dev.max_len == 1024
    assert e.read(0x1C) == e.read(0x20) == 0


def test_doorbell_copies_through_dma_and_fires_msix(vm: FakeVm) -> None:
    e = Echo(vm)
    gsi = e.enable_msix()
    payload = bytes(range(256)) * 3
    vm.memory.write(SRC_BUF, payload)
    e.copy(SRC_BUF, DST_BUF, len(payload))
    assert vm.memory.read(DST_BUF, len(payload)) == payload
    assert vm.msi_count(gsi) == 1
    assert e.read(0x1C) == 1 and e.read(0x20) == 1 and e.read(0x24) == 1   # DONE, counts
    e.write(0x1C, 1)                                  # write 1 to clear
    assert e.read(0x1C) == 0
    assert vm.loop.faults == []


def test_doorbell_work_runs_on_the_event_loop(vm: FakeVm) -> None:
    """Both ways in: a bar_write (no KVM) and the ioeventfd KVM would signal."""
    e = Echo(vm)
    threads = []
    ring = e.dev.ring
    e.dev.ring = lambda: (threads.append(vm.loop.on_loop_thread), ring())
    e.copy(SRC_BUF, DST_BUF, 4)
    (fd,) = [fd for fd, addr, n in vm.ioeventfds if (addr, n) == (e.regs + 0x28, 4)]
    assert threads == [True] and e.read(0x20) == 1
    os.eventfd_write(fd, 1)                           # what KVM does on the guest's write
    vm.sync()
    assert e.read(0x20) == 2                          # ring() ran (bound at realize())


def test_without_msix_intx_is_raised_and_acknowledged(vm: FakeVm) -> None:
    e = Echo(vm)
    vm.memory.write(SRC_BUF, b"ping")
    e.copy(SRC_BUF, DST_BUF, 4)
    line = e.dev.intx
    assert vm.memory.read(DST_BUF, 4) == b"ping" and line.level
    e.write(0x1C, 1)
    assert not line.level


def test_bus_mastering_off_means_no_dma(vm: FakeVm) -> None:
    e = Echo(vm)
    gsi = e.enable_msix()
    vm.memory.write(SRC_BUF, b"secret")
    e.master(False)
    e.copy(SRC_BUF, DST_BUF, 6)
    assert vm.memory.read(DST_BUF, 6) == bytes(6)
    assert vm.msi_count(gsi) == 0
    assert e.read(0x1C) == 2 and e.read(0x20) == 0    # ERROR, nothing copied
    e.write(0x1C, 2)
    e.master(True)                                    # not broken: it works again
    e.copy(SRC_BUF, DST_BUF, 6)
    assert vm.memory.read(DST_BUF, 6) == b"secret" and vm.msi_count(gsi) == 1


@pytest.mark.parametrize("src, n", [(1 << 40, 16), (16 * 1024 * 1024 - 8, 16), (SRC_BUF, 8192)],
                         ids=["outside-ram", "runs-off-ram", "over-max-len"])
def test_bad_dma_faults_the_device_not_the_bus(vm: FakeVm, src: int, n: int) -> None:
    e = Echo(vm, {"max_len": 4096})
    gsi = e.enable_msix()
    e.copy(src, DST_BUF, n)                           # no exception out of the bus write
    assert [name for name, _ in vm.loop.faults] == ["pci-echo"]
    assert "GuestError" in vm.loop.faults[0][1] or "GuestMemoryError" in vm.loop.faults[0][1]
    assert e.read(0x1C) == 2 and e.read(0x20) == 0 and vm.msi_count(gsi) == 0
    vm.memory.write(SRC_BUF, b"ok")
    e.copy(SRC_BUF, DST_BUF, 2)                       # broken until reset
    assert vm.memory.read(DST_BUF, 2) == bytes(2)
    vm.pci.reset()
    assert e.read(0x1C) == 0
    e.copy(SRC_BUF, DST_BUF, 2)
    assert vm.memory.read(DST_BUF, 2) == b"ok"


def test_host_resource_outlives_a_reboot(installed: dict) -> None:
    """A reboot builds a fresh VM and fresh devices, with the same host context: COUNT
    starts again, TOTAL (kept in the host resource) goes on."""
    vm, rebooted = FakeVm(), FakeVm()
    try:
        e = Echo(vm)
        e.copy(SRC_BUF, DST_BUF, 4)
        e2 = Echo(rebooted, host=vm.host)
        assert e2.dev is not e.dev and e2.dev.stats is e.dev.stats
        e2.copy(SRC_BUF, DST_BUF, 4)
        assert (e2.read(0x20), e2.read(0x24)) == (1, 2)
        other = Echo(rebooted, host=vm.host, device_id="echo1", slot=6)   # its own stats
        assert other.dev.stats is not e.dev.stats
    finally:
        rebooted.close()
        vm.close()
