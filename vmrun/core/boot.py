"""Loading Linux: an ELF vmlinux through its PVH entry, or a bzImage through the boot protocol.

PVH (the x86/HVM direct boot ABI) starts the kernel's 32-bit entry with paging off and
``ebx`` pointing at an ``hvm_start_info``; no decompressor runs, which matters on hosts where
guest kernel code is emulated. A bzImage (boot protocol >= 2.10, 64-bit capable) is entered at
its 64-bit entry with identity page tables, as xhyve's kexec does. Both get the same e820 map,
command line and initrd placed high.

Each check of the image says what is wrong in one line (``VmrunError``), before the VM runs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from vmrun.core import layout
from vmrun.core.memory import GuestMemory
from vmrun.errors import VmrunError

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
BOOT_MAGIC_HDRS = 0x53726448  # "HdrS"
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7


@dataclass
class EntryState:
    """The CPU state the boot path asks the BSP to start in."""

    mode: str                    # "pvh32" or "long64"
    rip: int
    rbx: int = 0
    rsi: int = 0
    regs: dict[str, int] = field(default_factory=dict)


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: RAM with the 640K..1M BIOS hole reserved."""
    entries: list[tuple[int, int, int]] = []
    for slot in mem.slots:
        if slot.gpa == 0:
            entries.append((0, layout.EBDA_START, E820_RAM))
            entries.append((layout.EBDA_START, 0x100000 - layout.EBDA_START, E820_RESERVED))
            if slot.size > 0x100000:
                entries.append((0x100000, slot.size - 0x100000, E820_RAM))
        else:
            entries.append((slot.gpa, slot.size, E820_RAM))
    return entries


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise VmrunError(f"{path}: cannot read {what}: {e.strerror}") from None


def detect_kernel_format(data: bytes) -> str:
    if data[:4] == b"\x7fELF":
        return "elf"
    if len(data) >= 0x206 and struct.unpack_from("<I", data, 0x202)[0] == BOOT_MAGIC_HDRS:
        return "bzimage"
    return "unknown"


INITRD_TOP = 0x3800_0000    # 896 MiB: the lowmem limit older kernels assume for the initrd
PROBE_BYTES = 64 << 10      # what probe_kernel reads of headers, program headers and notes


def initrd_limit(memory: int, kernel_end: int, initrd_top: int = INITRD_TOP) -> int:
    """The largest initrd :func:`place_initrd` can put into a machine of ``memory`` bytes of
    RAM, above a kernel ending at ``kernel_end``: it must fit, page aligned, between the end of
    the kernel and the top of low RAM, 896 MiB at most (so 895 MiB less the kernel however
    much memory the machine has), and below ``initrd_top`` (a bzImage's initrd_addr_max + 1)."""
    top = min(memory, layout.LOW_RAM_END, INITRD_TOP, initrd_top) & ~0xFFF
    return max(0, top - ((kernel_end + 0xFFF) & ~0xFFF))


def bzimage_initrd_top(head: bytes) -> int:
    """One past the highest address a bzImage lets its initrd reach (initrd_addr_max + 1;
    protocols before 2.03 leave it 0, meaning 0x37FFFFFF)."""
    return (struct.unpack_from("<I", head, 0x22C)[0] or 0x37FFFFFF) + 1


def probe_kernel(path: Path, size: int) -> tuple[str, int, int]:
    """Check the kernel image at ``path`` (``size`` bytes, a regular file) the way the loaders
    will, reading only its headers: -> (format, guest address where the loaded kernel ends,
    one past the highest address its initrd may reach).

    Raises ValueError with the reason (the caller names the key and the file), so that the
    machine file check refuses what :func:`load_kernel` would, before a VM exists.
    """
    if size == 0:
        raise ValueError("the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(PROBE_BYTES)
        fmt = detect_kernel_format(head)
        if fmt == "elf":
            return fmt, _probe_elf(f, head, size), INITRD_TOP
    if fmt == "bzimage":
        return fmt, _probe_bzimage(head, size), bzimage_initrd_top(head)
    raise ValueError("not a Linux kernel (neither an ELF vmlinux nor a bzImage)")


def _probe_elf(f, head: bytes, size: int) -> int:
    if len(head) < 64 or head[4] != 2 or head[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF kernel")
    e_machine = struct.unpack_from("<H", head, 18)[0]
    e_phoff = struct.unpack_from("<Q", head, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
    if e_machine != 62:
        raise ValueError(f"ELF machine {e_machine} is not x86-64")
    if e_phentsize != 56 or e_phoff + e_phnum * 56 > size:
        raise ValueError("truncated or corrupt ELF program headers")
    f.seek(e_phoff)
    phdrs = f.read(e_phnum * 56)
    end = 0
    entry = None
    for i in range(e_phnum):
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            struct.unpack_from("<IIQQQQQQ", phdrs, i * 56)
        if p_offset + p_filesz > size:
            raise ValueError(f"ELF segment {i} runs past the end of the file (truncated image?)")
        if p_type == 1:
            end = max(end, p_paddr + p_memsz)
        elif p_type == 4 and entry is None:
            f.seek(p_offset)
            entry = _find_pvh_note(f.read(min(p_filesz, PROBE_BYTES)))
    if entry is None:
        raise ValueError("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it "
                         "with CONFIG_PVH=y or boot its bzImage")
    if end == 0:
        raise ValueError("ELF kernel has no loadable segments")
    return end


def _probe_bzimage(head: bytes, size: int) -> int:
    if len(head) < 0x270:
        raise ValueError("not a Linux bzImage (truncated boot header)")
    version = struct.unpack_from("<H", head, 0x206)[0]
    if version < 0x20A:
        raise ValueError(f"boot protocol {version >> 8}.{version & 0xFF:02} is too old (need "
                         "2.10 or later)")
    if not struct.unpack_from("<H", head, 0x236)[0] & XLF_KERNEL_64:
        raise ValueError("bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)")
    if not head[0x211] & LOADED_HIGH:
        raise ValueError("bzImage is not loadable at 1 MiB (zImage?)")
    setup_size = ((head[0x1F1] or 4) + 1) * 512
    if setup_size >= size:
        raise ValueError(f"bzImage is truncated (setup of {setup_size} bytes, file of {size})")
    init_size = struct.unpack_from("<I", head, 0x260)[0]
    return layout.KERNEL_START + max(size - setup_size, init_size)


def place_initrd(mem: GuestMemory, initrd: bytes, kernel_end: int, path: Path,
                 initrd_top: int = INITRD_TOP) -> int:
    """Put the initrd as high in low RAM as fits (page aligned, below 4 GiB, 896 MiB's
    lowmem limit that older kernels assume, and the kernel's own ``initrd_top``); returns its
    guest address."""
    low = mem.slots[0]
    top = min(low.end, INITRD_TOP, initrd_top)
    addr = (top - len(initrd)) & ~0xFFF
    if addr < kernel_end:
        raise VmrunError(f"{path}: initrd of {len(initrd)} bytes does not fit in guest RAM "
                         f"above the kernel (ends at {kernel_end:#x}); give the machine more "
                         "memory")
    mem.write(addr, initrd)
    return addr


def write_cmdline(mem: GuestMemory, cmdline: str) -> int:
    raw = cmdline.encode() + b"\0"
    if len(raw) > layout.CMDLINE_MAX:
        raise VmrunError(f"kernel command line is {len(raw)} bytes (max {layout.CMDLINE_MAX})")
    mem.write(layout.CMDLINE_START, raw)
    return layout.CMDLINE_START


# -- ELF / PVH ------------------------------------------------------------------
def parse_pvh_elf(data: bytes, path: Path) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Returns (PVH entry, [(paddr, file offset, filesz, memsz)]) of an x86-64 ELF vmlinux."""
    if len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise VmrunError(f"{path}: not a 64-bit little-endian ELF kernel")
    (e_type, e_machine, _v, _entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize, e_phnum) = \
        struct.unpack_from("<HHIQQQIHHH", data, 16)
    if e_machine != 62:
        raise VmrunError(f"{path}: ELF machine {e_machine} is not x86-64")
    if e_phentsize != 56 or e_phoff + e_phnum * 56 > len(data):
        raise VmrunError(f"{path}: truncated or corrupt ELF program headers")
    loads = []
    entry = None
    for i in range(e_phnum):
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * 56)
        if p_offset + p_filesz > len(data):
            raise VmrunError(f"{path}: ELF segment {i} runs past the end of the file "
                             "(truncated image?)")
        if p_type == 1:  # PT_LOAD
            loads.append((p_paddr, p_offset, p_filesz, p_memsz))
        elif p_type == 4:  # PT_NOTE
            entry = _find_pvh_note(data[p_offset:p_offset + p_filesz]) or entry
    if entry is None:
        raise VmrunError(f"{path}: ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); "
                         "build it with CONFIG_PVH=y or boot its bzImage")
    if not loads:
        raise VmrunError(f"{path}: ELF kernel has no loadable segments")
    return entry, loads


def _find_pvh_note(notes: bytes) -> int | None:
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        off += 12
        name = notes[off:off + namesz]
        off += (namesz + 3) & ~3
        desc = notes[off:off + descsz]
        off += (descsz + 3) & ~3
        if name.rstrip(b"\0") == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz >= 4:
            return int.from_bytes(desc[:4] if descsz == 4 else desc[:8], "little")
    return None


def load_pvh(mem: GuestMemory, kernel: Path, initrd: Path | None, cmdline: str,
             rsdp_addr: int) -> EntryState:
    data = _read_file(kernel, "kernel")
    entry, loads = parse_pvh_elf(data, kernel)
    kernel_end = 0
    for paddr, offset, filesz, memsz in loads:
        if not mem.contains(paddr, memsz):
            raise VmrunError(f"{kernel}: ELF segment at {paddr:#x}+{memsz:#x} does not fit in "
                             "guest RAM; give the machine more memory")
        mem.write(paddr, data[offset:offset + filesz])
        if memsz > filesz:
            mem.fill(paddr + filesz, memsz - filesz)
        kernel_end = max(kernel_end, paddr + memsz)

    cmdline_addr = write_cmdline(mem, cmdline)
    nr_modules = 0
    if initrd is not None:
        blob = _read_file(initrd, "initrd")
        addr = place_initrd(mem, blob, kernel_end, initrd)
        mem.write(layout.PVH_MODLIST, struct.pack("<QQQQ", addr, len(blob), 0, 0))
        nr_modules = 1
    e820 = e820_map(mem)
    table = b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in e820)
    mem.write(layout.PVH_MEMMAP, table)
    start_info = struct.pack("<IIIIQQQQII", HVM_START_MAGIC, 1, 0, nr_modules,
                             layout.PVH_MODLIST if nr_modules else 0, cmdline_addr, rsdp_addr,
                             layout.PVH_MEMMAP, len(e820), 0)
    mem.write(layout.PVH_START_INFO, start_info)
    return EntryState(mode="pvh32", rip=entry, rbx=layout.PVH_START_INFO)


# -- bzImage ------------------------------------------------------------------------
def load_bzimage(mem: GuestMemory, kernel: Path, initrd: Path | None, cmdline: str) -> EntryState:
    data = _read_file(kernel, "kernel")
    if len(data) < 0x270 or struct.unpack_from("<I", data, 0x202)[0] != BOOT_MAGIC_HDRS:
        raise VmrunError(f"{kernel}: not a Linux bzImage (no 'HdrS' boot header at 0x202)")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x20A:
        raise VmrunError(f"{kernel}: boot protocol {version >> 8}.{version & 0xFF:02} is too old "
                         "(need 2.10 or later)")
    setup_sects = data[0x1F1] or 4
    xloadflags = struct.unpack_from("<H", data, 0x236)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise VmrunError(f"{kernel}: bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)")
    loadflags = data[0x211]
    if not loadflags & LOADED_HIGH:
        raise VmrunError(f"{kernel}: bzImage is not loadable at 1 MiB (zImage?)")
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise VmrunError(f"{kernel}: bzImage is truncated (setup of {setup_size} bytes, file of "
                         f"{len(data)})")
    pm_kernel = data[setup_size:]
    init_size = struct.unpack_from("<I", data, 0x260)[0]
    if not mem.contains(layout.KERNEL_START, max(len(pm_kernel), init_size)):
        raise VmrunError(f"{kernel}: kernel needs {init_size} bytes at 1 MiB; give the machine "
                         "more memory")
    mem.write(layout.KERNEL_START, pm_kernel)
    kernel_end = layout.KERNEL_START + max(len(pm_kernel), init_size)

    zp = bytearray(4096)
    hdr_end = 0x202 + data[0x201]  # setup header runs from 0x1F1 to 0x202 + byte at 0x201
    zp[0x1F1:hdr_end] = data[0x1F1:hdr_end]
    zp[0x210] = 0xFF                          # type_of_loader: undefined
    zp[0x211] = loadflags | CAN_USE_HEAP
    struct.pack_into("<H", zp, 0x224, 0xFE00)  # heap_end_ptr
    cmdline_addr = write_cmdline(mem, cmdline)
    struct.pack_into("<I", zp, 0x228, cmdline_addr)
    if initrd is not None:
        blob = _read_file(initrd, "initrd")
        addr = place_initrd(mem, blob, kernel_end, initrd, bzimage_initrd_top(data))
        struct.pack_into("<II", zp, 0x218, addr, len(blob))
    e820 = e820_map(mem)
    zp[0x1E8] = len(e820)
    for i, (a, s, t) in enumerate(e820):
        struct.pack_into("<QQI", zp, 0x2D0 + 20 * i, a, s, t)
    mem.write(layout.ZERO_PAGE, bytes(zp))
    return EntryState(mode="long64", rip=layout.KERNEL_START + 0x200, rsi=layout.ZERO_PAGE)


def load_kernel(mem: GuestMemory, kernel: Path, initrd: Path | None, cmdline: str,
                rsdp_addr: int) -> EntryState:
    """Load ``kernel`` (PVH ELF or bzImage) into guest memory, say how to start the BSP."""
    with open(kernel, "rb") as f:
        head = f.read(0x210)
    fmt = detect_kernel_format(head)
    if fmt == "elf":
        return load_pvh(mem, kernel, initrd, cmdline, rsdp_addr)
    if fmt == "bzimage":
        return load_bzimage(mem, kernel, initrd, cmdline)
    raise VmrunError(f"{kernel}: not a Linux kernel (neither an ELF vmlinux nor a bzImage)")
