"""Networking end to end: the shared device boot of the default Linux guest
(tests/e2e/conftest.py) with three virtio-net cards, plus the native ``vnet`` guest as a second
VM on a socket link.

- ``eth0`` (``backend = "user"``, passt, a ``forward``, a pcap ``capture``): the kernel's
  ``ip=dhcp`` takes its address from passt (the IP-Config line); the guest fetches a page
  from an HTTP server this test runs on the host's loopback (passt maps the gateway address
  to it; the host server sees the request); the host fetches a page from the guest's busybox
  ``httpd`` through the forward; ``tcpdump -r`` finds the DHCP exchange in the capture, from
  the MAC that the machine file's UUID gives (the same on every run, checked host-side);
- ``eth1`` (``backend = "tap"``): vmrun creates the tap, the test moves it into a network
  namespace it made; the guest pings the namespace and the capture shows the echo replies;
- ``eth2`` (``backend = "socket"``, ``connect``): its peer is a second vmrun VM (the
  ``vnet`` echo responder, started once the Linux guest's shell runs, so the link comes up
  late); the guest pings it and the capture shows the replies.

Traffic goes only to the host's loopback (through passt), the test's namespace and the
second VM; the guest gets no DNS resolver (passt runs with ``--no-dhcp-dns``).

Laid out to be lifted into a shared boot: part 1 (``net_setup``, ``net_devices``,
``NET_CMDLINE``, ``net_teardown``), part 2 (``net_before_user_space`` while the kernel boots,
``net_drive`` in the shell), part 3 (the ``test_*`` checks on the console and host files).
"""

from __future__ import annotations

import http.server
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.harness import GuestRun
from vmrun.config import load_machine
from vmrun.net.options import derive_mac, format_mac

pytestmark = pytest.mark.e2e
VMRUN = (sys.executable, "-m", "vmrun")


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _http_server(token: str, body: bytes, seen: list[str]) -> _Server:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:      # noqa: N802
            seen.append(self.path)
            data = body if self.path == f"/{token}" else b"nope\n"
            self.send_response(200 if self.path == f"/{token}" else 404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    srv = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _tcpdump(pcap: Path, *filt: str) -> str:
    out = subprocess.run(["tcpdump", "-n", "-e", "-r", str(pcap), *filt], capture_output=True,
                         text=True)
    return out.stdout


def _echo_vm(d: Path) -> subprocess.Popen:
    from vmrun.testing import native

    elf = native.build("vnet")
    m = d / "echo.toml"
    m.write_text(f'''name = "e2e-echo"
cpus = 1
memory = "64M"
on_reboot = "exit"
[boot]
kernel = "{elf}"
cmdline = "echo=1 ip=10.0.3.2"
[serial.debugcon]
backend = "file"
path = "{d / "echo.log"}"
[devices.net]
model = "virtio-net"
backend = "socket"
listen = "{d / "link.sock"}"
mac = "02:00:00:00:03:02"
''')
    return subprocess.Popen([*VMRUN, "up", str(m)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _move_tap(tap: str, ns: str, deadline: float) -> None:
    while not Path("/sys/class/net", tap).exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"vmrun did not create tap {tap}")
        time.sleep(0.2)
    for cmd in (["ip", "link", "set", tap, "netns", ns],
                ["ip", "netns", "exec", ns, "ip", "addr", "add", "10.0.2.1/24", "dev", tap],
                ["ip", "netns", "exec", ns, "ip", "link", "set", tap, "up"]):
        subprocess.run(cmd, check=True)


def _shell(run: GuestRun, cmd: str, a: int, b: int, timeout: float = 180) -> str:
    """Run ``cmd`` in the guest shell, then wait for the marker ``a+b`` (printed by shell
    arithmetic, so the echoed command line cannot match it); returns the console since."""
    start = len(run.console)
    run.send(f"{cmd}; echo mark-$(({a}+{b}))\r".encode())
    run.wait_for(rf"mark-{a + b}\b", timeout)
    return run.console[start:].decode(errors="replace")


@dataclass
class NetSetup:
    """Host-side state of the network checks: servers, ports, the namespace, tokens, and
    what the guest run found."""

    dir: Path
    token: str
    server: _Server
    hport: int
    ns: str
    tap: str
    seen_paths: list[str]
    page_token: str = ""
    forward_page: str = ""
    results: dict[str, str] = field(default_factory=dict)
    echo: subprocess.Popen | None = None
    echo_log: str = ""


# -- part 1: devices and host-side set-up ----------------------------------------------------
#: Added to the kernel command line: DHCP on the passt NIC only (eth0: the lowest slot).
NET_CMDLINE = " ip=:::::eth0:dhcp"


def net_setup(d: Path) -> NetSetup:
    """An HTTP server on the host's loopback, a free port for the forward, a network
    namespace (the tap goes there once vmrun made it)."""
    for tool in ("passt", "tcpdump", "ip"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (make deps installs it)")
    if os.geteuid() != 0:
        pytest.fail("the tap and namespace checks need root")
    token = "tok-" + secrets.token_hex(4)
    body = ("body-" + secrets.token_hex(4)).encode()
    seen: list[str] = []
    srv = _http_server(token, body + b"\n", seen)
    tag = f"{os.getpid() % 100000}"
    ns, tap = f"vmrn{tag}", f"vmrt{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    return NetSetup(d, token, srv, _free_port(), ns, tap, seen)


def net_devices(n: NetSetup, first_slot: int = 3) -> str:
    """The ``[devices.*]`` fragment: eth0 user (passt, a forward, a capture), eth1 tap,
    eth2 socket (connect: its peer is the echo VM, started later)."""
    d = n.dir
    return f'''
[devices.net0]
model = "virtio-net"
slot = {first_slot}
backend = "user"
forward = ["tcp:127.0.0.1:{n.hport}:80"]
capture = "{d / "user.pcap"}"
[devices.net1]
model = "virtio-net"
slot = {first_slot + 1}
backend = "tap"
ifname = "{n.tap}"
capture = "{d / "tap.pcap"}"
[devices.net2]
model = "virtio-net"
slot = {first_slot + 2}
backend = "socket"
connect = "{d / "link.sock"}"
capture = "{d / "link.pcap"}"
'''


def _stop_echo(n: NetSetup) -> None:
    """End the echo VM (a polling guest: it keeps a host CPU busy while it runs)."""
    if n.echo is not None:
        n.echo.kill()
        n.echo.wait()
        n.echo = None
        log = n.dir / "echo.log"
        n.echo_log = log.read_text(errors="replace") if log.exists() else ""


def net_teardown(n: NetSetup) -> None:
    n.server.shutdown()
    _stop_echo(n)
    subprocess.run(["ip", "netns", "del", n.ns])


# -- part 2: driving the guest ---------------------------------------------------------------
def net_before_user_space(run: GuestRun, n: NetSetup) -> None:
    """While the kernel boots: move the tap vmrun made into the namespace, wait for DHCP."""
    _move_tap(n.tap, n.ns, time.monotonic() + 120)
    run.wait_for(r"IP-Config: Complete:[^\n]*\n[^\n]*")


def net_drive(run: GuestRun, n: NetSetup) -> None:
    """In the guest shell: wget from the host, httpd for the forward, ping the namespace
    over the tap, start the echo VM and ping it over the socket link."""
    out = _shell(run, f"wget -q -O - http://192.0.2.1:{n.server.server_port}/{n.token}", 40, 2)
    n.results["wget"] = out
    n.page_token = "page-" + secrets.token_hex(4)
    _shell(run, f"mkdir -p /www; echo {n.page_token} > /www/index.html; httpd -p 80 -h /www",
           40, 3)
    for _ in range(30):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{n.hport}/index.html",
                                        timeout=10) as r:
                n.forward_page = r.read().decode(errors="replace")
            break
        except OSError:
            time.sleep(1)
    n.results["tap"] = _shell(run, "ip addr add 10.0.2.2/24 dev eth1; ip link set eth1 up; "
                              "ping -c 3 -W 3 10.0.2.1", 40, 4, 240)
    n.echo = _echo_vm(n.dir)
    log = n.dir / "echo.log"
    end = time.monotonic() + 120
    while time.monotonic() < end and (not log.exists() or "echo ready" not in
                                      log.read_text(errors="replace")):
        time.sleep(0.5)
    # the connector retries every second; then the guest hears "link up"
    n.results["link"] = _shell(run, "ip addr add 10.0.3.1/24 dev eth2; ip link set eth2 up; "
                               "sleep 3; ping -c 3 -W 3 10.0.3.2", 40, 5, 240)
    _stop_echo(n)


@dataclass
class NetBoot:
    run: GuestRun
    setup: NetSetup
    machine: Path
    user_space: bool = False
    returncode: int | None = None


@pytest.fixture(scope="module")
def net_boot(devices_boot) -> NetBoot:
    """This module's part of the shared device boot (tests/e2e/conftest.py)."""
    return devices_boot.part("net")


# -- part 3: the checks ----------------------------------------------------------------------

def _need_user_space(boot: NetBoot) -> None:
    if not boot.user_space:
        pytest.skip("guest user space did not run on this host's KVM (see issue 2's note)")


def test_kernel_ip_dhcp_gets_its_address_from_passt(net_boot: NetBoot) -> None:
    m = re.search(r"IP-Config: Complete:\s+(?:\[[\d. ]+\]\s+)?device=eth0, hwaddr=([0-9a-f:]+), "
                  r"ipaddr=192\.0\.2\.2, mask=255\.255\.255\.0, gw=192\.0\.2\.1",
                  net_boot.run.text)
    assert m, net_boot.run.text[-3000:]
    cfg = load_machine(net_boot.machine)
    assert m.group(1) == format_mac(derive_mac(str(cfg.uuid), "net0"))


def test_mac_is_stable_across_runs(net_boot: NetBoot) -> None:
    """The MAC comes from the machine's UUID (from its name) and the device id: loading the
    same file again (a second run) gives the same one, and the capture shows it in DHCP."""
    a, b = load_machine(net_boot.machine), load_machine(net_boot.machine)
    mac = format_mac(derive_mac(str(a.uuid), "net0"))
    assert mac == format_mac(derive_mac(str(b.uuid), "net0"))
    dump = _tcpdump(net_boot.setup.dir / "user.pcap", "udp", "port", "67")
    assert f"{mac} > ff:ff:ff:ff:ff:ff" in dump, dump


def test_capture_shows_the_dhcp_exchange(net_boot: NetBoot) -> None:
    dump = _tcpdump(net_boot.setup.dir / "user.pcap", "-v", "udp", "port", "67")
    for what in ("DHCP-Message (53), length 1: Discover", "DHCP-Message (53), length 1: Offer",
                 "DHCP-Message (53), length 1: Request", "DHCP-Message (53), length 1: ACK"):
        assert what in dump, dump[-3000:]


def test_guest_fetches_from_the_host_loopback_via_passt(net_boot: NetBoot) -> None:
    _need_user_space(net_boot)
    assert f"/{net_boot.setup.token}" in net_boot.setup.seen_paths   # the host saw it
    assert re.search(r"body-[0-9a-f]{8}", net_boot.setup.results["wget"])


def test_host_fetches_from_the_guest_httpd_through_a_forward(net_boot: NetBoot) -> None:
    _need_user_space(net_boot)
    assert net_boot.setup.forward_page.strip() == net_boot.setup.page_token


def test_tap_in_a_namespace_carries_a_ping(net_boot: NetBoot) -> None:
    _need_user_space(net_boot)
    dump = _tcpdump(net_boot.setup.dir / "tap.pcap", "icmp")
    assert re.search(r"10\.0\.2\.1 > 10\.0\.2\.2: ICMP echo reply", dump), dump


def test_two_vms_on_a_socket_link_reach_each_other(net_boot: NetBoot) -> None:
    _need_user_space(net_boot)
    assert "vnet: echo ready" in net_boot.setup.echo_log, net_boot.setup.echo_log
    dump = _tcpdump(net_boot.setup.dir / "link.pcap", "icmp")
    assert re.search(r"10\.0\.3\.2 > 10\.0\.3\.1: ICMP echo reply", dump), \
        dump + net_boot.setup.results.get("link", "")


def test_guest_powers_off(net_boot: NetBoot) -> None:
    _need_user_space(net_boot)
    assert net_boot.returncode == 1, net_boot.run.log[-2000:]
