"""The shared device boot: one boot of the default guest carries every PCI device the
device modules check (virtio-net ×3 with its second VM, AHCI ×3, the fbuf display, xHCI),
because each boot costs minutes where KVM emulates guest kernel code.

Each device module keeps its three parts — set-up (the ``[devices.*]`` fragment), the drive
(what the guest shell does) and its ``test_*`` checks — and its fixture hands its checks its
part of this boot. A part whose drive failed fails only that module's checks (with the
reason), the others still run.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import BOOT_TIMEOUT, POWEROFF, GuestRun, require_guest_image


@dataclass
class DevicesBoot:
    run: GuestRun
    dir: Path
    machine: Path
    user_space: bool = False
    returncode: int | None = None
    parts: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def part(self, name: str) -> Any:
        """A module's part, or a failure naming why its drive did not finish."""
        if name in self.failed:
            pytest.fail(f"the shared device boot's {name} part failed:\n{self.failed[name]}")
        return self.parts[name]


@pytest.fixture(scope="session")
def default_boot(tmp_path_factory):
    """The default guest booted once and saved at its shell (tests/e2e/test_guest.py); the
    checks of test_guest.py and test_control.py restore that shell."""
    from tests.e2e.test_guest import boot_default

    return boot_default(tmp_path_factory)


@pytest.fixture(scope="session")
def devices_boot(tmp_path_factory) -> DevicesBoot:
    from tests.e2e import test_ahci as ahci
    from tests.e2e import test_fbuf as fbuf
    from tests.e2e import test_net as net
    from tests.e2e import test_xhci as xhci

    kernel, initrd = require_guest_image()
    d = tmp_path_factory.mktemp("devices")
    n = net.net_setup(d)
    ahci_frag, ahci_setup = ahci.ahci_devices(d)
    fb_frag, fb_extra, vnc_port = fbuf.fbuf_setup(console_tty0=False)
    usb_frag = xhci.xhci_devices()
    cmdline = fbuf.guest_cmdline(fb_extra) + net.NET_CMDLINE
    machine = d / "devices.toml"
    machine.write_text(f'''name = "e2e-devices"
cpus = 1
memory = "256M"
on_reboot = "exit"
[cpu]
profile = "compat"
[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{cmdline}"
[serial.com1]
backend = "stdio"
{net.net_devices(n)}
{ahci_frag}
{fb_frag}
{usb_frag}
''')
    run = GuestRun(machine)
    boot = DevicesBoot(run, d, machine)

    def step(name: str, fn, *args) -> Any:
        """Run one module's drive; its exception fails only that module's checks."""
        if name in boot.failed:
            return None
        try:
            return fn(*args)
        except Exception:
            boot.failed[name] = traceback.format_exc(limit=6)
            return None

    missed = None
    try:
        step("net", net.net_before_user_space, run, n)
        up = run.wait_for(r"vmrun-init: user space is up|Kernel panic[^\n]*", BOOT_TIMEOUT)
        boot.user_space = b"user space is up" in up.group(0)
        if boot.user_space:
            time.sleep(2)
            step("net", net.net_drive, run, n)
            missed = step("ahci", ahci.drive_ahci_shell, run, False)
            step("xhci", xhci.drive_xhci, run)
        boot.parts["fbuf"] = fbuf.FbufRun(run, d, boot.user_space)
        step("fbuf-drive", fbuf.drive_fbuf, run, vnc_port, d, boot.user_space, False,
             boot.parts["fbuf"])
        if "fbuf-drive" in boot.failed:       # the checks whose step did not run say why
            boot.parts["fbuf"].vnc_log.append(boot.failed["fbuf-drive"])
        if boot.user_space:
            if boot.failed:                   # a step that timed out may still be running
                run.send(b"\x03")
                time.sleep(2)
            run.send(POWEROFF)
        try:
            boot.returncode = run.wait_exit(300)
        except AssertionError as e:     # the checks that need the exit code say so
            boot.failed["poweroff"] = str(e)
        return boot
    finally:
        run.close()
        net.net_teardown(n)
        boot.parts["net"] = net.NetBoot(run, n, machine, boot.user_space, boot.returncode)
        boot.parts["ahci"] = ahci.Boot(run, ahci_setup, boot.returncode, missed or [])
        boot.parts["xhci"] = run
