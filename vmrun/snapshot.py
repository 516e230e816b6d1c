"""Snapshots of a running machine: ``vmrun snapshot NAME FILE``, ``vmrun up --restore FILE``.

A snapshot is two files: ``FILE``, JSON (format ``vmrun-snapshot``, version 1): what the
machine is (name, uuid, vCPUs, memory, serial ports, PCI functions by slot and model: a
restore refuses another machine, one line), every device's state (the
:mod:`vmrun.core.devstate` contract), the KVM state (:mod:`vmrun.core.kvmstate`), and
``FILE.ram``: guest RAM, slot after slot at its offset in the file, then the memory of every
RAM-backed BAR (:class:`vmrun.core.pci.RamBar`: a framebuffer) of the PCI functions in
(slot, function, BAR) order, written sparse (runs of zero pages are holes), so its size on
disk is what the guest used. RAM BARs are guest-visible memory that is not in the guest's
RAM slots: saving them here, for every device, keeps them out of the devices' JSON state.

While the state and RAM are read the devices' event loop is held
(:meth:`vmrun.core.eventloop.EventLoop.held`): no frame is received, no timer fires, so the
device state and the RAM agree.

Disk images are not copied: a disk device flushes and its image must be the same file, unchanged, at
restore (a device that cannot promise that refuses to be snapshotted). Taking one pauses the
vCPUs for the time it takes and resumes them if they ran.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmrun.core.devstate import SnapshotUnsupported
from vmrun.errors import VmrunError

if TYPE_CHECKING:
    from vmrun.config import MachineConfig
    from vmrun.machine import Machine

FORMAT, VERSION = "vmrun-snapshot", 1
CHUNK = 1 << 20
MAX_HEADER = 64 << 20


#: The CPUID leaves that say which CPU the guest was given: vendor, family/model/stepping
#: and the feature bits (1, 7, 0x80000001) and the XSAVE layout (0xd), whose state the
#: snapshot holds. A guest restored onto another CPU would keep using instructions and
#: state components it may no longer have, so a restore there is refused (one line).
CPU_LEAVES = ((0x0, 0), (0x1, 0), (0x7, 0), (0xD, 0), (0xD, 1), (0x80000001, 0))


def guest_cpu(machine: Machine) -> dict[str, list[int]]:
    """The identifying CPUID leaves of vCPU 0, ``{"0x1.0": [eax, ebx, ecx, edx]}`` (leaf 1's
    EBX without its per-vCPU APIC ID and counts)."""
    by_leaf = {(e["function"], e["index"]): e for e in machine.vm.vcpus[0].cpuid}
    out = {}
    for fn, idx in CPU_LEAVES:
        e = by_leaf.get((fn, idx))
        if e is not None:
            regs = [e["eax"], e["ebx"], e["ecx"], e["edx"]]
            if fn == 1:
                regs[1] &= 0xFFFF
            out[f"{fn:#x}.{idx}"] = regs
    return out


def identity(cfg: MachineConfig, machine: Machine) -> dict[str, Any]:
    """What must match between the machine that was saved and the one restored into."""
    return {"name": cfg.name, "uuid": str(cfg.uuid), "cpus": cfg.cpus, "memory": cfg.memory,
            "serial": sorted(machine.uarts),
            "pci": [[p.slot or 0, p.func, p.type.name, p.id] for p in machine.placed],
            "cpu": guest_cpu(machine)}


def ram_path(path: Path) -> Path:
    return path.with_name(path.name + ".ram")


def _regions(machine: Machine) -> list[memoryview]:
    """What ``FILE.ram`` holds, in order: the RAM slots, then every RAM BAR."""
    mem = machine.vm.memory
    assert mem is not None
    views = [slot.view[:slot.size] for slot in mem.slots]
    for _key, dev in sorted(machine.pci.devices.items()):
        views += [dev.ram_bars[i].view for i in sorted(dev.ram_bars)]
    return views


def _write_ram(machine: Machine, path: Path) -> int:
    """Guest RAM and RAM BARs into ``path``, sparse: returns the bytes written (not
    holes)."""
    written = 0
    zero = bytes(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        for view in _regions(machine):
            for at in range(0, len(view), CHUNK):
                piece = view[at:at + CHUNK]
                if piece != zero[:len(piece)]:
                    os.pwrite(fd, piece, offset + at)
                    written += len(piece)
            offset += len(view)
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _read_ram(machine: Machine, path: Path) -> None:
    regions = _regions(machine)
    total = sum(len(v) for v in regions)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise VmrunError(f"{path}: cannot read the snapshot's RAM: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size != total:
            raise VmrunError(f"{path}: {os.fstat(fd).st_size} bytes of RAM, the machine has "
                             f"{total} (RAM and RAM BARs)")
        offset = 0
        for view in regions:
            at = 0
            while at < len(view):
                n = os.preadv(fd, [view[at:at + CHUNK]], offset + at)
                if n <= 0:
                    raise VmrunError(f"{path}: RAM file ends early")
                at += n
            offset += len(view)
    finally:
        os.close(fd)


def save(cfg: MachineConfig, machine: Machine, path: Path) -> dict[str, Any]:
    """Write the snapshot of ``machine`` (vCPUs paused) to ``path``; returns a summary."""
    t0 = time.monotonic()
    with machine.host.loop.held():
        try:
            devices = machine.save_state()
        except SnapshotUnsupported as e:
            raise VmrunError(f"cannot snapshot {cfg.name}: {e}") from None
        for dev in machine.devices:
            flush = getattr(getattr(dev, "device", dev), "flush_for_snapshot", None)
            if flush is not None:
                flush()
        written = _write_ram(machine, ram_path(path))
    header = {"format": FORMAT, "version": VERSION, "saved": time.time(),
              "machine": identity(cfg, machine), "state": devices}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(header))
    os.replace(tmp, path)
    return {"file": str(path), "ram-file": str(ram_path(path)), "ram-bytes": written,
            "seconds": round(time.monotonic() - t0, 3),
            "refused": devices["kvm"].get("refused", [])}


def _hex(regs: Any) -> str:
    if not isinstance(regs, list):
        return "absent"
    return "[" + ", ".join(f"{r:#x}" if isinstance(r, int) else repr(r) for r in regs) + "]"


def load_header(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
        if st.st_size > MAX_HEADER:
            raise VmrunError(f"{path}: snapshot file of {st.st_size} bytes (at most "
                             f"{MAX_HEADER})")
        header = json.loads(path.read_text())
    except OSError as e:
        raise VmrunError(f"{path}: cannot read snapshot: {e.strerror}") from None
    except ValueError:
        raise VmrunError(f"{path}: not a vmrun snapshot (no JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise VmrunError(f"{path}: not a vmrun snapshot")
    if header.get("version") != VERSION:
        raise VmrunError(f"{path}: snapshot version {header.get('version')!r}, this vmrun "
                         f"reads {VERSION}")
    for key in ("machine", "state"):
        if not isinstance(header.get(key), dict):
            raise VmrunError(f"{path}: damaged snapshot: {key!r} is not a table")
    return header


def restore(cfg: MachineConfig, machine: Machine, path: Path,
            header: dict[str, Any] | None = None) -> list[str]:
    """Put the snapshot at ``path`` into ``machine`` (built from ``cfg``, not started).
    Returns what this host's KVM refused. A mismatched machine is one VmrunError line."""
    header = header or load_header(path)
    want, have = header["machine"], identity(cfg, machine)
    for key in ("name", "uuid", "cpus", "memory", "serial", "pci"):
        if want.get(key) != have[key]:
            raise VmrunError(f"{path}: the snapshot is of another machine: {key} is "
                             f"{json.dumps(want.get(key))}, {cfg.path} has "
                             f"{json.dumps(have[key])}")
    saved_cpu = want.get("cpu")
    if saved_cpu != have["cpu"]:
        leaves = sorted(set(saved_cpu) | set(have["cpu"])) if isinstance(saved_cpu, dict) \
            else []
        diff = next((k for k in leaves if saved_cpu.get(k) != have["cpu"].get(k)), None)
        raise VmrunError(f"{path}: the snapshot was taken on another CPU (or with other "
                         f"[cpu] settings): " + (
                             f"CPUID leaf {diff} (eax, ebx, ecx, edx) was "
                             f"{_hex(saved_cpu.get(diff))}, here it is "
                             f"{_hex(have['cpu'].get(diff))}" if diff is not None else
                             "it records no CPU") + "; a snapshot restores on the same kind "
                         "of host CPU with the same machine file")
    _read_ram(machine, ram_path(path))
    try:
        return machine.load_state(header["state"])
    except KeyError as e:
        raise VmrunError(f"{path}: damaged snapshot: no {e} in its state") from None
    except (ValueError, SnapshotUnsupported) as e:
        raise VmrunError(f"{path}: cannot restore: {e}") from None
    except Exception as e:  # noqa: BLE001 - the file is input, as a machine file is
        # A damaged or hand-edited file whose values are not even of the right shape (a
        # number where a table was): one line. The machine was built for this restore only
        # and is not started; the devices check the types of what they keep
        # (vmrun.core.devstate.check_like), so a restored machine runs on sound state.
        raise VmrunError(f"{path}: cannot restore (damaged snapshot?): "
                         f"{type(e).__name__}: {e}") from None
