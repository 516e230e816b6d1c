"""Benchmark: virtio-blk sequential 1 MiB reads and writes with O_DIRECT inside the guest.

Boots the default guest with a raw disk; its /init runs busybox ``dd`` with
iflag=direct / oflag=direct and prints dd's own throughput, then powers off. The same is tried
under QEMU 7.2 (same kernel, initramfs, disk, command line) and the ratio printed when QEMU gets
there. Random 4 KiB reads at queue depth 32 need fio in the guest, which the busybox initramfs
does not have yet: not measured.

Usage: python bench/blk.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZE_MIB = 32
# Debian's busybox dd prints no throughput line: time each dd with busybox's `time`.
RUN = (f"time dd if=/dev/vda of=/dev/null bs=1M count={SIZE_MIB} iflag=direct; "
       f"time dd if=/dev/zero of=/dev/vda bs=1M count={SIZE_MIB} oflag=direct; poweroff -f")
REAL = re.compile(r"real\s+(\d+)m\s*([\d.]+)s")


def rates(text: str) -> list[float]:
    """MB/s of each timed dd, from busybox time's "real XmY.Zs" lines."""
    out = []
    for minutes, seconds in REAL.findall(text):
        secs = int(minutes) * 60 + float(seconds)
        out.append(SIZE_MIB * 1.048576 / secs if secs else 0.0)
    return out


def _run_qemu(cmd: list[str]) -> subprocess.CompletedProcess:
    """QEMU stops (paused, not exited) on a KVM internal error: give it a deadline."""
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=400)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else \
            (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else \
            (e.stderr or "")
        return subprocess.CompletedProcess(cmd, -9, out, err)


def main() -> None:
    sys.path.insert(0, str(REPO))
    from vmrun.config import load_machine

    tiny = load_machine(REPO / "machines" / "tiny.toml")
    cmdline = tiny.boot.cmdline + f' run="{RUN}"'
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        disk = Path(d) / "disk.img"
        with open(disk, "wb") as f:
            f.write(b"\xa5" * (SIZE_MIB << 20))
        machine = Path(d) / "blk.toml"
        machine.write_text(f'''name = "blk"
cpus = 2
memory = "256M"
on_reboot = "exit"
[cpu]
profile = "compat"
[boot]
kernel = "{tiny.boot.kernel}"
initrd = "{tiny.boot.initrd}"
cmdline = '{cmdline}'
[devices.disk]
model = "virtio-blk"
path = "{disk}"
''')
        out = subprocess.run([sys.executable, "-m", "vmrun", "up", str(machine)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=1800)
        ours = rates(out.stdout)
        print(f"vmrun: sequential read {ours[0] if ours else '?'} MB/s, "
              f"write {ours[1] if len(ours) > 1 else '?'} MB/s (1 MiB, O_DIRECT)")
        qemu = shutil.which("qemu-system-x86_64")
        if qemu:
            q = _run_qemu([qemu, "-enable-kvm", "-M", "pc", "-nodefaults", "-no-reboot",
                                "-cpu", "qemu64,-cx16", "-m", "256", "-smp", "2",
                                "-kernel", str(tiny.boot.kernel), "-initrd",
                                str(tiny.boot.initrd), "-append", cmdline, "-serial", "stdio",
                                "-display", "none", "-drive",
                                f"file={disk},if=virtio,format=raw,cache=none"],
                          )
            theirs = rates(q.stdout)
            if len(theirs) >= 2 and len(ours) >= 2:
                print(f"qemu:  read {theirs[0]} MB/s, write {theirs[1]} MB/s; ratios "
                      f"{ours[0] / theirs[0]:.2f} / {ours[1] / theirs[1]:.2f} (goal >= 1.0)")
            else:
                tail = (q.stdout + q.stderr).strip().splitlines()[-3:]
                print(f"qemu: no figure (it did not get to user space here): {tail}")


if __name__ == "__main__":
    main()
