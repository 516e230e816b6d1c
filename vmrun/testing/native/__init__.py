"""Native test guests: small C programs that run entirely in guest user mode (CPL3).

``entry.S`` takes the PVH entry, maps the low 4 GiB and drops to CPL3 with IOPL=3, so the
program does port I/O and MMIO like a driver while never running guest kernel code — which,
on a host whose KVM emulates guest kernel mode (kvm-pvm), makes it run at native speed. The
same ELF boots under vmrun and QEMU (``-kernel``), which makes it a like-for-like device test
and benchmark. Built with the host's gcc and cached outside the repository.

- ``vblk``: a polling virtio-blk driver and benchmark (see ``vblk.c``);
- ``vahci``: the same for an AHCI controller with NCQ (see ``vahci.c``);
- ``vnet``: a polling virtio-net driver, benchmark and ping responder (see ``vnet.c``);
- ``e1000``: the same for an Intel 8254x NIC, legacy rings (see ``e1000.c``);
- ``vfb``: draws frames into a bochs-display framebuffer (see ``vfb.c``);
- ``vxhci``: an xHCI doorbell and command benchmark (see ``vxhci.c``);
- ``ucheck``: does user mode keep its registers, FPU state, FS/GS bases and memory while
  interrupts, ucalls, system calls (vmrun's syscall fix-up on kvm-pvm), page faults, remaps,
  CR3 switches and TLB shootdowns happen (1 or 2 vCPUs; see ``ucheck.c``, issue 8).

They share ``runtime.h`` (types, port I/O and MMIO, the debug console and its lines, the exit,
the default ucall and exception handlers, command-line options, PCI configuration space and BAR
placement): each ``NAME.c`` defines ``GUEST_NAME`` (its console prefix) and includes it, keeping
only its device logic; ``vblk`` and ``vnet`` also share ``virtio.h`` (the virtio PCI transport).
Every header here is part of every guest's cache key, so changing one rebuilds them all.

``lcheck.c`` and ``fstart.c`` are not among them: they are static Linux programs for the
default guest (``lcheck``: ucheck's user-mode checks; ``fstart``: glibc's start-up copy into a
fresh heap page), which ``bench/guest_integrity.py`` builds and runs (modes ``linux``,
``preempt``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from vmrun.errors import VmrunError
from vmrun.image import cache_dir

SOURCE_DIR = Path(__file__).parent
# Every ``NAME.c`` here is a guest (built with entry.S): adding one needs no edit here.
#: (``lcheck.c`` and ``fstart.c`` are Linux programs, not native guests.)
LINUX_PROGRAMS = ("lcheck", "fstart")
GUESTS = tuple(sorted(p.stem for p in SOURCE_DIR.glob("*.c") if p.stem not in LINUX_PROGRAMS))
CFLAGS = ["-O2", "-ffreestanding", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
          "-fno-pic", "-no-pie", "-nostdlib", "-static", "-mgeneral-regs-only", "-mno-red-zone",
          "-fno-stack-protector", "-fcf-protection=none", "-Wall", "-Wextra",
          "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments"]


def cache_key(name: str) -> str:
    """What ``build`` names its ELF by: the flags, the guest's sources, the linker script and
    every header here (``runtime.h``), which any guest may include."""
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    headers = sorted(SOURCE_DIR.glob("*.h"))
    for p in (SOURCE_DIR / "entry.S", SOURCE_DIR / f"{name}.c", SOURCE_DIR / "link.ld", *headers):
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(name: str) -> Path:
    """The ELF (with a PVH note) of native guest ``name``, built if its sources changed."""
    if name not in GUESTS:
        raise VmrunError(f"unknown native guest {name!r} (known: {', '.join(GUESTS)})")
    if shutil.which("gcc") is None:
        raise VmrunError("gcc is missing: install the Debian package gcc (make deps does)")
    sources = [SOURCE_DIR / "entry.S", SOURCE_DIR / f"{name}.c"]
    script = SOURCE_DIR / "link.ld"
    out = cache_dir() / "native" / f"{name}-{cache_key(name)}.elf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    res = subprocess.run(["gcc", *CFLAGS, "-T", str(script), "-o", str(tmp),
                          *map(str, sources)], capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise VmrunError(f"native guest {name} did not build:\n{res.stderr[-2000:]}")
    os.replace(tmp, out)
    return out
