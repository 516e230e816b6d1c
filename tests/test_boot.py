"""Boot protocols: PVH (ELF vmlinux) and bzImage, their checks and the state the kernel gets.

Structures are checked in guest memory; then synthetic kernels run on KVM and report what they
were handed (start-info / zero-page address, magic numbers, command line, initrd, e820)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from vmrun.core import layout
from vmrun.core.boot import (
    E820_RAM,
    E820_RESERVED,
    HVM_START_MAGIC,
    e820_map,
    load_kernel,
)
from vmrun.core.exits import ExitCode
from vmrun.core.memory import GuestMemory
from vmrun.errors import VmrunError
from vmrun.testing import kernels

kvm_only = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")


@pytest.fixture
def mem():
    m = GuestMemory.for_size(64 * layout.MiB)
    yield m
    m.close()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_e820_reserves_the_bios_hole_and_splits_high_ram() -> None:
    m = GuestMemory.for_size(4 * layout.GiB)
    try:
        e = e820_map(m)
    finally:
        m.close()
    assert e[0] == (0, layout.EBDA_START, E820_RAM)
    assert e[1][2] == E820_RESERVED and e[1][0] + e[1][1] == 0x100000
    assert e[2] == (0x100000, layout.LOW_RAM_END - 0x100000, E820_RAM)
    assert e[3] == (layout.HIGH_RAM_START, layout.GiB, E820_RAM)


def test_pvh_start_info(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, "vmlinux", kernels.pvh_elf())
    rd = write(tmp_path, "initrd", b"\x1f\x8b" + bytes(5000))
    entry = load_kernel(mem, k, rd, "console=ttyS0 quiet", rsdp_addr=0xE0000)
    assert entry.mode == "pvh32" and entry.rip == 0x100000
    assert entry.rbx == layout.PVH_START_INFO
    magic, version, flags, nmods, modlist, cmdline, rsdp, memmap, nmap = struct.unpack(
        "<IIIIQQQQI", mem.read(layout.PVH_START_INFO, 52))
    assert (magic, version, nmods, rsdp) == (HVM_START_MAGIC, 1, 1, 0xE0000)
    assert mem.read(cmdline, 20) == b"console=ttyS0 quiet\0"
    paddr, size = struct.unpack("<QQ", mem.read(modlist, 16))
    assert size == 5002 and mem.read(paddr, 2) == b"\x1f\x8b" and paddr % 4096 == 0
    assert nmap == 3 and memmap == layout.PVH_MEMMAP


def test_bzimage_zero_page(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, "bzImage", kernels.bzimage())
    rd = write(tmp_path, "initrd", bytes(100))
    entry = load_kernel(mem, k, rd, "root=/dev/vda", rsdp_addr=0)
    assert entry.mode == "long64" and entry.rip == layout.KERNEL_START + 0x200
    zp = mem.read(layout.ZERO_PAGE, 4096)
    assert struct.unpack_from("<I", zp, 0x202)[0] == 0x53726448
    assert zp[0x210] == 0xFF and zp[0x211] & 0x80
    cmd = struct.unpack_from("<I", zp, 0x228)[0]
    assert mem.read(cmd, 14) == b"root=/dev/vda\0"
    addr, size = struct.unpack_from("<II", zp, 0x218)
    assert size == 100 and addr > layout.KERNEL_START
    assert zp[0x1E8] == 3


def test_bzimage_initrd_stays_below_the_kernels_initrd_addr_max(tmp_path: Path,
                                                               mem: GuestMemory) -> None:
    k = write(tmp_path, "bzImage", kernels.bzimage(initrd_addr_max=0x00FF_FFFF))   # 16 MiB
    rd = write(tmp_path, "initrd", bytes(5000))
    load_kernel(mem, k, rd, "", rsdp_addr=0)
    addr, size = struct.unpack_from("<II", mem.read(layout.ZERO_PAGE, 4096), 0x218)
    assert size == 5000 and addr + size <= 0x100_0000 and addr % 4096 == 0


BAD_KERNELS = {
    "not a kernel": (b"hello world" * 100, "not a Linux kernel"),
    "empty": (b"", "not a Linux kernel"),
    "32-bit ELF": (b"\x7fELF\x01\x01\x01" + bytes(100), "not a 64-bit"),
    "ELF for another machine": (kernels.pvh_elf()[:18] + b"\xb7\x00" + kernels.pvh_elf()[20:],
                                "is not x86-64"),
    "ELF without PVH note": (kernels.pvh_elf().replace(b"Xen\0", b"Lnx\0"), "no PVH entry note"),
    "truncated ELF": (kernels.pvh_elf()[:0x1002], "past the end of the file"),
    "old boot protocol": (kernels.bzimage(version=0x0209), "too old"),
    "no 64-bit entry": (kernels.bzimage(xloadflags=0), "no 64-bit entry"),
    "truncated bzImage": (kernels.bzimage()[:0x300], "bzImage is truncated"),
}


@pytest.mark.parametrize("name", sorted(BAD_KERNELS))
def test_bad_kernel_images_say_what_is_wrong(tmp_path: Path, mem: GuestMemory, name: str) -> None:
    data, expected = BAD_KERNELS[name]
    k = write(tmp_path, "kernel", data)
    with pytest.raises(VmrunError) as e:
        load_kernel(mem, k, None, "", 0)
    msg = str(e.value)
    assert expected in msg and str(k) in msg and "\n" not in msg


def test_initrd_too_big_for_memory(tmp_path: Path) -> None:
    m = GuestMemory.for_size(4 * layout.MiB)
    try:
        k = write(tmp_path, "vmlinux", kernels.pvh_elf())
        rd = write(tmp_path, "initrd", bytes(8 * layout.MiB))
        with pytest.raises(VmrunError, match="does not fit"):
            load_kernel(m, k, rd, "", 0)
    finally:
        m.close()


def test_missing_initrd(tmp_path: Path, mem: GuestMemory) -> None:
    k = write(tmp_path, "vmlinux", kernels.pvh_elf())
    with pytest.raises(VmrunError, match="cannot read initrd"):
        load_kernel(mem, k, tmp_path / "nope", "", 0)


class Reporter:
    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.values.append(value)


def _run_kernel(tmp_path: Path, image: bytes, name: str) -> tuple[list[int], object]:
    from vmrun.core.vm import Vm

    vm = Vm(64 * layout.MiB, 1, irqchip=False)
    try:
        k = write(tmp_path, name, image)
        rd = write(tmp_path, "initrd", bytes(4096))
        entry = load_kernel(vm.memory, k, rd, "hello", rsdp_addr=0xE0000)
        vm.vcpus[0].set_entry_state(entry)
        rep = Reporter()
        vm.pio.insert(rep, kernels.REPORT_PORT, 4)
        vm.start()
        info = vm.wait(20)
        return rep.values, info
    finally:
        vm.close()


@kvm_only
def test_pvh_kernel_runs_with_start_info(tmp_path: Path) -> None:
    values, info = _run_kernel(tmp_path, kernels.pvh_elf("debug_exit_2"), "vmlinux")
    assert values[:2] == [layout.PVH_START_INFO, HVM_START_MAGIC]
    assert values[2] == 1                     # one module: the initrd
    assert values[3] == layout.CMDLINE_START
    assert values[4] == 3                     # e820 entries
    # Nothing serves the debug-exit port in a bare Vm: the code falls through to hlt.
    assert info.code == ExitCode.HALT


@kvm_only
def test_bzimage_kernel_runs_in_long_mode_with_zero_page(tmp_path: Path) -> None:
    values, info = _run_kernel(tmp_path, kernels.bzimage("debug_exit_2"), "bzImage")
    assert values[0] == layout.ZERO_PAGE
    assert values[1] == 0x53726448
    assert values[2] == layout.CMDLINE_START
    assert values[3] > layout.KERNEL_START
    assert values[4] == 3
    assert info.code == ExitCode.HALT
