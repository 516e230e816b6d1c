"""Does guest user space compute right? Counted, per configuration (issue 8).

Two guests, each run for a fixed time with 1 or 2 vCPUs, on an idle host or under a host load
(``--load``: ``stress-ng --cpu N`` on every host core, plus ``/proc/sys/vm/compact_memory``
every few seconds: page migration is what a busy host does to guest RAM):

``native``
    ``ucheck`` (``vmrun/testing/native/ucheck.c``): no Linux, no syscall fix-up, user mode at
    native speed; counts register (GPR, XMM), FS/GS base, checksum and memory mismatches
    while timer interrupts, ucalls and ucalls with VMM exits arrive. Isolates the host's KVM.
``linux``
    The default guest (``machines/tiny.toml`` with ``cpus`` replaced): a script on a scratch
    disk loops for ``--secs`` seconds over ``md5sum`` of a file (user-space compute), the same
    bytes through a pipe, and a shell arithmetic loop, printing each answer; the *host* counts
    the wrong ones against the digest it computed itself. Holds every slot of the
    host-wide boot lock (``/tmp/vmrun-e2e.lock.N``, tests/e2e/harness.py): it boots alone.

``preempt``
    The default guest starts fresh programs one after another, ``--starts`` times each, first
    alone and then beside a busy loop (``(while :; do :; done) &``): ``fstart``
    (``vmrun/testing/native/fstart.c``, glibc's start-up copy into a fresh heap page, by SSE,
    ``rep movsb`` or general registers) and busybox ``cat``. Counts the failed starts per
    phase and copy, and the kernel's segfault lines (issue 8: beside a busy loop nearly every
    fresh busybox died at start-up).

Example: ``python bench/guest_integrity.py linux --cpus 2 --secs 90 [--load]`` (one boot, so
one hold of the lock; keep it under ~6 minutes: boot ~3-4 minutes + ``--secs``). The last line
is a summary: ``RESULT guest=... cpus=... load=... samples=N wrong=K rate=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK_PATH = os.environ.get("VMRUN_E2E_LOCK", "/tmp/vmrun-e2e.lock")
DATA_SIZE = 64 * 1024
ARITH = 3000          # the shell loop's count
# ucheck's mismatch counters (its other numbers count work done)
NATIVE_KINDS = ("regs", "xmm", "ucall", "pio", "fpu", "fx", "sys", "pf", "fsswitch", "roots",
                "remap", "shoot_ipi", "shoot_pv", "sum", "fsgs", "mem_k", "mem_u", "b_xmm")


@contextlib.contextmanager
def host_load(on: bool) -> Iterator[None]:
    """``stress-ng --cpu`` on every core, and memory compaction every 5 s, while inside."""
    if not on:
        yield
        return
    if shutil.which("stress-ng") is None:
        raise SystemExit("stress-ng is missing: apt-get install stress-ng (make bench does)")
    proc = subprocess.Popen(["stress-ng", "--cpu", str(os.cpu_count() or 1), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()

    def compact() -> None:
        while not stop.wait(5):
            with contextlib.suppress(OSError):
                Path("/proc/sys/vm/compact_memory").write_text("1\n")

    t = threading.Thread(target=compact, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        proc.terminate()
        proc.wait()


def run_native(args: argparse.Namespace, d: Path) -> tuple[int, int, str]:
    from vmrun.testing import native

    elf = native.build("ucheck")
    log = d / "debugcon.log"
    machine = d / "ucheck.toml"
    machine.write_text(f'''name = "ucheck"
cpus = {args.cpus}
memory = "128M"
on_reboot = "exit"
{"huge_pages = true" if args.huge_pages else ""}
[boot]
kernel = "{elf}"
cmdline = "secs={args.secs} hz={args.hz} cpus={args.cpus} huge={int(args.huge)}"
[serial.debugcon]
backend = "file"
path = "{log}"
''')
    with host_load(args.load):
        subprocess.run([sys.executable, "-m", "vmrun", "up", str(machine)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=args.secs * 4 + 120)
    text = log.read_text(errors="replace")
    samples = wrong = 0
    for line in text.splitlines():
        if line.startswith("ucheck: done cpu"):
            counts = dict(re.findall(r"(\w+)=(\d+)", line))
            samples += int(counts["rounds"])
            wrong += sum(int(counts[k]) for k in NATIVE_KINDS)
    return samples, wrong, text


# Each round: md5sum in a new process, through a pipe, a shell loop in a subshell, then one
# md5sum process over the same file SAME times (many digests, no process creation between).
SAME = 10
SCRIPT = """\
dd if=/dev/vda of=/tmp/d bs=4096 skip=1 count={blocks} 2>/dev/null
dd if=/dev/vda of=/tmp/lc bs=4096 skip={lskip} count={lblocks} 2>/dev/null; chmod +x /tmp/lc
/tmp/lc {secs} > /tmp/l1 & /tmp/lc {secs} > /tmp/l2 &
t=$(cut -d. -f1 /proc/uptime); end=$((t + {secs})); n=0; F=$(for i in $(seq {same}); do \
echo /tmp/d; done)
while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do
n=$((n+1)); a=$(md5sum /tmp/d); b=$(cat /tmp/d | md5sum)
c=$(i=0; while [ $i -lt {arith} ]; do i=$((i+1)); done; echo $i)
echo "R $n ${{a%% *}} ${{b%% *}} $c"
md5sum $F | sed "s/^/S $n /"
done
wait; cat /tmp/l1 /tmp/l2
echo "DONE $n"
poweroff -f
exit
"""


def build_lcheck(d: Path, name: str = "lcheck") -> bytes:
    """``vmrun/testing/native/NAME.c`` as a static Linux program (no libc)."""
    out = d / name
    subprocess.run(["gcc", "-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin",
                    "-fno-stack-protector", "-fcf-protection=none", "-mgeneral-regs-only",
                    "-fno-pic", "-no-pie", "-Wl,--build-id=none", "-o", str(out),
                    str(REPO / "vmrun" / "testing" / "native" / f"{name}.c")], check=True)
    return out.read_bytes()


LCHECK_KINDS = ("regs", "sys", "fs", "mem", "cow")


def boot_linux(args: argparse.Namespace, d: Path) -> str:
    """Boot the default guest with ``d / "scratch.img"`` as /dev/vda, whose first block is the
    script vmrun-init runs; holds every e2e lock slot; returns the console's text."""
    tiny = (REPO / "machines" / "tiny.toml").read_text()
    tiny = re.sub(r"(?m)^cpus = \d+", f"cpus = {args.cpus}", tiny)
    tiny = re.sub(r'(?m)^(cmdline = ".*)"$', r'\1 run=\"sh /dev/vda\""', tiny)
    tiny = tiny.replace('backend = "stdio"', f'backend = "file"\npath = "{d / "console.log"}"')
    if args.features:
        table = "".join(f"{k} = {v}\n" for k, v in
                        (kv.split("=") for kv in args.features.split(",")))
        tiny = tiny.replace('profile = "compat"\n', f'profile = "compat"\n[cpu.features]\n{table}')
    tiny += f'\n[devices.scratch]\nmodel = "virtio-blk"\npath = "{d / "scratch.img"}"\n'
    machine = d / "tiny.toml"
    machine.write_text(tiny)
    console = d / "console.log"
    # Every e2e lock slot (tests/e2e/harness.py): the host runs this boot alone.
    with contextlib.ExitStack() as locks:
        for i in range(max(1, int(os.environ.get("VMRUN_E2E_SLOTS", str(os.cpu_count() or 1))))):
            fcntl.flock(locks.enter_context(open(f"{LOCK_PATH}.{i}", "a+")), fcntl.LOCK_EX)
        t0 = time.monotonic()
        with host_load(args.load):
            proc = subprocess.Popen([sys.executable, "-m", "vmrun", "up", str(machine)],
                                    cwd=REPO, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # A boot that has not reached user space in --boot-timeout seconds is stopped
            # (2-vCPU boots here sometimes stop for good at the clocksource switch).
            up_at = None
            while proc.poll() is None:
                time.sleep(2)
                now = time.monotonic()
                if up_at is None and console.exists() and \
                        b"vmrun-init: user space is up" in console.read_bytes():
                    up_at = now
                    print(f"user space after {now - t0:.0f} s", file=sys.stderr)
                if (up_at is None and now - t0 > args.boot_timeout) or \
                        (up_at is not None and now - up_at > args.secs + 120):
                    print(f"stopped after {now - t0:.0f} s "
                          f"({'no user space' if up_at is None else 'loop overran'})",
                          file=sys.stderr)
                    proc.kill()
                    proc.wait()
        print(f"boot + run: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return console.read_text(errors="replace") if console.exists() else ""


def run_linux(args: argparse.Namespace, d: Path) -> tuple[int, int, str]:
    data = hashlib.shake_256(b"vmrun guest integrity").digest(DATA_SIZE)
    digest = hashlib.md5(data).hexdigest()
    lcheck = build_lcheck(d)
    lblocks = -(-len(lcheck) // 4096)
    script = SCRIPT.format(secs=args.secs, blocks=DATA_SIZE // 4096, arith=ARITH, same=SAME,
                           lskip=1 + DATA_SIZE // 4096, lblocks=lblocks).encode()
    assert len(script) < 4096
    (d / "scratch.img").write_bytes(script.ljust(4096, b"\n") + data +
                                    lcheck.ljust(lblocks * 4096, b"\0"))
    text = boot_linux(args, d)
    samples = wrong = 0
    kinds = {k: [0, 0] for k in ("file", "pipe", "arith", "same")}   # samples, wrong
    kinds["lcheck"] = [0, 0]
    for line in text.splitlines():
        if line.startswith("L pid="):           # an lcheck process's tally (rounds, mismatches)
            counts = dict(re.findall(r"(\w+)=(\d+)", line))
            kinds["lcheck"][0] += int(counts["rounds"])
            kinds["lcheck"][1] += sum(int(counts[k]) for k in LCHECK_KINDS)
            continue
        if line.startswith("S "):               # one md5sum process, many digests
            samples += 1
            kinds["same"][0] += 1
            m = re.match(r"S (\d+) (\S+)  /tmp/d\s*$", line)
            if not m or m.group(2) != digest:
                wrong += 1
                kinds["same"][1] += 1
                print("wrong (same process):", repr(line), file=sys.stderr)
            continue
        m = re.match(r"R (\d+) (\S*) (\S*) (\S*)\s*$", line)
        if not m:
            if line.startswith("R "):          # a garbled line: every answer in it counts
                samples += 3
                wrong += 3
                print("garbled:", line, file=sys.stderr)
            continue
        answers = [("file", m.group(2), digest), ("pipe", m.group(3), digest),
                   ("arith", m.group(4), str(ARITH))]
        samples += 3
        for kind, got, want in answers:
            kinds[kind][0] += 1
            if got != want:
                wrong += 1
                kinds[kind][1] += 1
                print(f"wrong (line {m.group(1)}): {got!r} != {want!r}", file=sys.stderr)
    reporting = text.count("\nL pid=") + text.startswith("L pid=")
    print(f"lcheck processes that reported: {reporting}/2", file=sys.stderr)
    if reporting < 2 and "DONE " in text:   # one died (a crash is the worst wrong answer)
        kinds["lcheck"][1] += 2 - reporting
    samples += kinds["lcheck"][0]
    wrong += kinds["lcheck"][1]
    print("by kind (wrong/samples): " + " ".join(f"{k}={w}/{n}" for k, (n, w) in kinds.items()),
          file=sys.stderr)
    print(f"kernel segfault lines: {text.count('segfault at')}", file=sys.stderr)
    if "DONE " not in text:
        print("the guest did not finish its loop; console tail:\n" + text[-1500:],
              file=sys.stderr)
    return samples, wrong, text


# preempt: fresh programs started alone, then beside a busy loop; each start's exit status
# (139: SIGSEGV) printed by the long-running shell, the kernel's segfault lines counted too.
PREEMPT_SCRIPT = """\
dd if=/dev/vda of=/tmp/f bs=4096 skip=1 count={blocks} 2>/dev/null; chmod +x /tmp/f
phase() {{ for v in s r g c; do i=0; while [ $i -lt {starts} ]; do i=$((i+1))
if [ $v = c ]; then /bin/cat /dev/null; else /tmp/f $v; fi; echo "P $1 $v $i $?"; done; done; }}
phase alone
(while :; do :; done) &
phase busy
kill $!
echo "DONE 1"
poweroff -f
exit
"""
PREEMPT_VARIANTS = {"s": "fstart SSE copy", "r": "fstart rep movsb", "g": "fstart GPR copy",
                    "c": "busybox cat"}


def run_preempt(args: argparse.Namespace, d: Path) -> tuple[int, int, str]:
    """Fresh programs alone and beside a busy loop: fstart's three copies and busybox."""
    prog = build_lcheck(d, "fstart")
    blocks = -(-len(prog) // 4096)
    script = PREEMPT_SCRIPT.format(blocks=blocks, starts=args.starts).encode()
    (d / "scratch.img").write_bytes(script.ljust(4096, b"\n") + prog.ljust(blocks * 4096, b"\0"))
    text = boot_linux(args, d)
    counts: dict[tuple[str, str], list[int]] = {}
    for m in re.finditer(r"(?m)^P (alone|busy) ([srgc]) \d+ (\d+)\s*$", text):
        c = counts.setdefault((m.group(1), m.group(2)), [0, 0])
        c[0] += 1
        c[1] += m.group(3) != "0"
    for (phase, v), (n, bad) in sorted(counts.items()):
        print(f"{phase:5} {PREEMPT_VARIANTS[v]:17} failed {bad}/{n}", file=sys.stderr)
    print(f"kernel segfault lines: {text.count('segfault at')}, fstart BAD lines: "
          f"{text.count('F BAD')}", file=sys.stderr)
    for line in text.splitlines():
        if "F BAD" in line or "segfault at" in line:
            print("  " + line.strip()[:160], file=sys.stderr)
    if "DONE " not in text:
        print("the guest did not finish; console tail:\n" + text[-1500:], file=sys.stderr)
    return (sum(n for n, _ in counts.values()), sum(b for _, b in counts.values()), text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("guest", choices=("native", "linux", "preempt"))
    p.add_argument("--starts", type=int, default=25,
                   help="preempt: starts of each program per phase")
    p.add_argument("--cpus", type=int, default=1, choices=(1, 2))
    p.add_argument("--secs", type=int, default=60)
    p.add_argument("--load", action="store_true", help="stress-ng on every core + compaction")
    p.add_argument("--hz", type=int, default=250, help="native: LAPIC timer rate")
    p.add_argument("--huge", action="store_true", help="native: 2 MiB guest pages")
    p.add_argument("--huge-pages", action="store_true", help="native: THP-backed guest RAM")
    p.add_argument("--keep", action="store_true", help="print the guest's whole output")
    p.add_argument("--features", default="",
                   help="linux: [cpu.features] overrides, e.g. kvm_pv_tlb_flush=false,...")
    p.add_argument("--boot-timeout", type=int, default=330,
                   help="linux: seconds to reach user space before the boot is stopped")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmrun-integrity-") as tmp:
        run = {"native": run_native, "linux": run_linux, "preempt": run_preempt}[args.guest]
        samples, wrong, text = run(args, Path(tmp))
    lines = text.splitlines()
    print("\n".join(lines if args.keep else [ln for ln in lines if "first" in ln
                                              or "done" in ln or "exception" in ln][:20]))
    rate = wrong / samples if samples else float("nan")
    print(f"RESULT guest={args.guest} cpus={args.cpus} load={int(args.load)} "
          f"secs={args.secs} samples={samples} wrong={wrong} rate={rate:.4f}"
          f"{' features=' + args.features if args.features else ''}")


if __name__ == "__main__":
    main()
