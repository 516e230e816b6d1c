"""The kernel and initrd out of a disk image's own /boot, for direct kernel boot.

Debian publishes its cloud image without the kernel beside it; vmrun boots kernels directly
(no firmware, no bootloader), so ``vmrun image pull debian-12`` copies them out once: the
image is read through vmrun's own block backends (qcow2 included), its GPT gives the Linux
partitions, each is copied to a sparse temporary file (only the non-zero MiBs are written)
and e2fsprogs' ``debugfs`` lists ``/boot`` and dumps the newest matching files. Nothing is
mounted and nothing needs root.
"""

from __future__ import annotations

import fnmatch
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

from vmrun.errors import VmrunError

LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"
CHUNK = 1 << 20
MAX_ENTRIES = 1024


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def gpt_partitions(disk) -> list[tuple[int, int, str]]:
    """(first byte, length, type GUID) of each partition of ``disk`` (a BlockBackend with a
    GPT; the primary header at LBA 1, 512-byte sectors)."""
    head = bytearray(512)
    disk.readv(512, [memoryview(head)])
    if head[:8] != b"EFI PART":
        raise VmrunError("the image has no GPT partition table")
    entries_lba, count, size = struct.unpack_from("<QII", head, 72)
    if not 128 <= size <= 4096 or count > MAX_ENTRIES:
        raise VmrunError(f"the image's GPT is malformed ({count} entries of {size} bytes)")
    table = bytearray(count * size)
    disk.readv(entries_lba * 512, [memoryview(table)])
    out = []
    for i in range(count):
        e = table[i * size:(i + 1) * size]
        first, last = struct.unpack_from("<QQ", e, 32)
        if e[:16] == bytes(16) or last < first:
            continue
        start, length = first * 512, (last - first + 1) * 512
        if start + length > disk.size:
            raise VmrunError(f"GPT partition {i + 1} ends past the end of the image")
        out.append((start, length, _guid(e[:16])))
    return out


def _copy_out(disk, start: int, length: int, dest: Path) -> None:
    zero = bytes(CHUNK)
    buf = bytearray(CHUNK)
    with open(dest, "wb") as f:
        f.truncate(length)
        done = 0
        while done < length:
            n = min(CHUNK, length - done)
            view = memoryview(buf)[:n]
            disk.readv(start + done, [view])
            if view != zero[:n]:
                f.seek(done)
                f.write(view)
            done += n


def _debugfs(fs: Path, request: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["debugfs", "-R", request, str(fs)], capture_output=True,
                              timeout=300)
    except FileNotFoundError:
        raise VmrunError("debugfs is missing: install the Debian package e2fsprogs (make deps "
                         "does)") from None


def _version_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _newest(names: list[str], pattern: str) -> str | None:
    matches = sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=_version_key)
    return matches[-1] if matches else None


def extract_boot_files(image: Path, globs: tuple[str, str], dest_dir: Path) -> tuple[str, str]:
    """Copy the newest ``/boot`` kernel and initrd matching ``globs`` out of ``image`` to
    ``dest_dir/vmlinuz`` and ``dest_dir/initrd``; returns their names in /boot."""
    from vmrun.block.image_tools import open_disk

    with open_disk(image, read_only=True) as disk:
        parts = sorted((p for p in gpt_partitions(disk) if p[2] == LINUX_FS),
                       key=lambda p: -p[1])
        if not parts:
            raise VmrunError(f"{image}: no Linux partition in its GPT")
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".extract-") as tmp:
            fs = Path(tmp) / "part.img"
            for start, length, _ in parts:
                _copy_out(disk, start, length, fs)
                ls = _debugfs(fs, "ls -p /boot")
                names = [f.split("/")[5] for f in ls.stdout.decode(errors="replace").splitlines()
                         if f.count("/") >= 6]
                kernel, initrd = _newest(names, globs[0]), _newest(names, globs[1])
                if kernel is None or initrd is None:
                    continue
                for name, local in ((kernel, "vmlinuz"), (initrd, "initrd")):
                    out = Path(tmp) / local
                    res = _debugfs(fs, f"dump /boot/{name} {out}")
                    if not out.exists() or out.stat().st_size == 0:
                        raise VmrunError(f"{image}: cannot copy /boot/{name} out: "
                                         f"{res.stderr.decode(errors='replace').strip()}")
                    os.replace(out, dest_dir / local)
                return kernel, initrd
    raise VmrunError(f"{image}: no /boot/{globs[0]} and /boot/{globs[1]} on any Linux "
                     "partition")
