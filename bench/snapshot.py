"""Benchmark: snapshot and restore of the default guest at its shell (issue 9).

Boots ``machines/tiny.toml`` in the background (console on a pty), waits for its shell,
switches its clocksource to kvm-clock (what a guest to be restored on a host whose KVM
ignores TSC writes needs; README "Snapshots"), then:

- ``vmrun snapshot`` ``--rounds`` times: wall time of the command, the time vmrun says the
  save took (vCPUs paused), the RAM file's size and what it occupies on disk (sparse), the
  JSON header's size; the guest must answer on its console after each one;
- ``vmrun up -d --restore`` of the last snapshot ``--rounds`` times: the time until ``up``
  returns (the VM runs) and until the restored shell answers a command whose answer the
  host checks (``echo tok$((50+5))`` prints ``tok55``: the shell computed it after the
  restore, no boot banner in between).

Verdicts come from the host: the answers are checked on the console, the files' sizes read
by the host. Usage: ``python bench/snapshot.py [--rounds 3] [--cpus 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
NAME = "snapbench"
BOOT_TIMEOUT = 900
RESTORABLE = (b"echo kvm-clock >/sys/devices/system/clocksource/clocksource0/"
              b"current_clocksource; sed 's/^/CS=/' /sys/devices/system/clocksource/"
              b"clocksource0/current_clocksource\r")


def vmrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmrun", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


class Console:
    """The slave side of a background VM's console pty."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        self.seen = b""

    def wait(self, want: bytes, timeout: float, send: bytes | None = None,
             every: float = 0) -> float | None:
        """Seconds until ``want`` shows after now (``send`` written first, and again
        every ``every`` s while it does not), or None."""
        t0 = time.monotonic()
        start = len(self.seen)
        last = 0.0
        while time.monotonic() - t0 < timeout:
            if send is not None and (last == 0.0 or every and time.monotonic() - last > every):
                os.write(self.fd, send)
                last = time.monotonic()
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if r:
                try:
                    self.seen += os.read(self.fd, 65536)
                except OSError:
                    return None
            if want in self.seen[start:]:
                return time.monotonic() - t0
        return None

    def close(self) -> None:
        os.close(self.fd)


def machine_file(tmp: Path, cpus: int) -> Path:
    text = (REPO / "machines" / "tiny.toml").read_text()
    text = text.replace('name = "tiny"', f'name = "{NAME}"', 1)
    text = text.replace("cpus = 2", f"cpus = {cpus}", 1)
    f = tmp / "snapbench.toml"
    f.write_text(text)
    return f


def console_of(name: str) -> Console:
    from vmrun import instances

    vm = instances.find(name)
    assert vm.console.startswith("pty:"), vm.console
    return Console(vm.console[4:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1, choices=(1, 2))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vmrun-snapbench-"))
    f = machine_file(tmp, args.cpus)
    vmrun("kill", NAME)
    t0 = time.monotonic()
    up = vmrun("up", "-d", "--console", "pty", str(f))
    if up.returncode != 0:
        print(f"up failed: {up.stderr}", file=sys.stderr)
        return 1
    con = console_of(NAME)
    rows: list[dict] = []
    try:
        if con.wait(b"vmrun-init: user space is up", BOOT_TIMEOUT) is None:
            print("no user space", file=sys.stderr)
            return 1
        if con.wait(b"ok2", 300, send=b"echo ok$((1+1))\r", every=10) is None:
            print("no shell", file=sys.stderr)
            return 1
        boot_s = time.monotonic() - t0
        if con.wait(b"CS=kvm-clock", 300, send=RESTORABLE) is None:
            print("clocksource not switched", file=sys.stderr)
            return 1
        print(f"boot to a shell: {boot_s:.0f} s")
        snap = tmp / "shell.snap"
        for i in range(args.rounds):
            t = time.monotonic()
            out = vmrun("snapshot", NAME, str(snap))
            wall = time.monotonic() - t
            if out.returncode != 0:
                print(f"snapshot failed: {out.stderr}", file=sys.stderr)
                return 1
            said = float(out.stderr.split(" in ")[1].split("s ")[0])
            ram = Path(f"{snap}.ram").stat()
            answered = con.wait(f"again{i}x".encode(), 120,
                                send=f"echo again$(({i}+0))x\r".encode())
            rows.append({"what": "snapshot", "wall": wall, "save": said,
                         "ram": ram.st_size, "ram_disk": ram.st_blocks * 512,
                         "header": snap.stat().st_size, "answered_after": answered})
        con.close()
        vmrun("stop", "--force", NAME, timeout=120)
        for _ in range(args.rounds):
            t = time.monotonic()
            up = vmrun("up", "-d", "--console", "pty", "--restore", str(snap), str(f))
            up_s = time.monotonic() - t
            if up.returncode != 0:
                print(f"restore failed: {up.stderr}", file=sys.stderr)
                return 1
            con = console_of(NAME)
            ans = con.wait(b"tok55", 300, send=b"echo tok$((50+5))\r", every=15)
            banner = b"Linux version" in con.seen
            con.close()
            vmrun("stop", "--force", NAME, timeout=120)
            rows.append({"what": "restore", "up": up_s,
                         "answer": None if ans is None else up_s + ans, "rebooted": banner})
    finally:
        vmrun("kill", NAME)
    snaps = [r for r in rows if r["what"] == "snapshot"]
    rests = [r for r in rows if r["what"] == "restore"]
    med = statistics.median
    print(f"snapshot ({len(snaps)}): vmrun snapshot {med(r['wall'] for r in snaps):.2f} s wall, "
          f"save {med(r['save'] for r in snaps):.2f} s with the vCPUs paused; RAM file "
          f"{snaps[-1]['ram'] >> 20} MiB, {snaps[-1]['ram_disk'] >> 20} MiB on disk; header "
          f"{snaps[-1]['header'] >> 10} KiB; shell answered after each: "
          f"{all(r['answered_after'] is not None for r in snaps)}")
    ok = all(r["answer"] is not None and not r["rebooted"] for r in rests)
    answered = f"{med(r['answer'] for r in rests):.2f}" if ok else "NO"
    print(f"restore ({len(rests)}): up -d --restore {med(r['up'] for r in rests):.2f} s, "
          f"restored shell answered (tok55) after {answered} s; "
          f"no boot banner: {not any(r['rebooted'] for r in rests)}")
    print(json.dumps(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
