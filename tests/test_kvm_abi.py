"""The cffi struct layouts and ioctl numbers match the kernel's <linux/kvm.h>.

A C program compiled against the installed header prints sizeof/offsetof and the ioctl
numbers; every one must equal what vmrun.core.kvm computes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmrun.core import kvm

STRUCTS = {
    "kvm_userspace_memory_region": ["slot", "flags", "guest_phys_addr", "memory_size",
                                    "userspace_addr"],
    "kvm_regs": ["rax", "rsp", "r15", "rip", "rflags"],
    "kvm_segment": ["base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                    "avl", "unusable"],
    "kvm_dtable": ["base", "limit"],
    "kvm_sregs": ["cs", "ldt", "gdt", "idt", "cr0", "cr8", "efer", "apic_base",
                  "interrupt_bitmap"],
    "kvm_fpu": ["fpr", "fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "xmm", "mxcsr"],
    "kvm_run": ["request_interrupt_window", "immediate_exit", "exit_reason",
                "ready_for_interrupt_injection", "if_flag", "flags", "cr8", "apic_base",
                "io", "mmio", "internal", "system_event", "kvm_valid_regs", "kvm_dirty_regs"],
    "kvm_cpuid_entry2": ["function", "index", "flags", "eax", "ebx", "ecx", "edx"],
    "kvm_cpuid2": ["nent", "entries"],
    "kvm_msr_entry": ["index", "data"],
    "kvm_msrs": ["nmsrs", "entries"],
    "kvm_pit_config": ["flags"],
    "kvm_irq_level": ["irq", "level"],
    "kvm_irqfd": ["fd", "gsi", "flags", "resamplefd"],
    "kvm_ioeventfd": ["datamatch", "addr", "len", "fd", "flags"],
    "kvm_msi": ["address_lo", "address_hi", "data", "flags", "devid"],
    "kvm_irq_routing_entry": ["gsi", "type", "flags", "u"],
    "kvm_irq_routing": ["nr", "flags", "entries"],
    "kvm_lapic_state": ["regs"],
    "kvm_translation": ["linear_address", "physical_address", "valid", "writeable", "usermode"],
    "kvm_vcpu_events": ["exception", "interrupt", "nmi", "sipi_vector", "flags", "smi",
                        "exception_has_payload", "exception_payload"],
    "kvm_enable_cap": ["cap", "flags", "args"],
    "kvm_dirty_log": ["slot", "dirty_bitmap"],
    "kvm_guest_debug": ["control", "arch"],
    "kvm_debug_exit_arch": ["exception", "pc", "dr6", "dr7"],
}
SUBFIELDS = {  # (struct, member path in C, member path in cffi)
    ("kvm_run", "io.port", "io.port"), ("kvm_run", "io.data_offset", "io.data_offset"),
    ("kvm_run", "mmio.phys_addr", "mmio.phys_addr"), ("kvm_run", "mmio.len", "mmio.len"),
    ("kvm_run", "mmio.is_write", "mmio.is_write"),
    ("kvm_run", "internal.suberror", "internal.suberror"),
    ("kvm_run", "internal.data", "internal.data"),
    ("kvm_run", "system_event.type", "system_event.type"),
    ("kvm_run", "debug.arch.pc", "debug.arch.pc"),
    ("kvm_run", "fail_entry.hardware_entry_failure_reason",
     "fail_entry.hardware_entry_failure_reason"),
    ("kvm_vcpu_events", "exception.nr", "exception.nr"),
    ("kvm_vcpu_events", "triple_fault.pending", "triple_fault_pending"),
    ("kvm_irq_routing_entry", "u.msi.data", "u.msi.data"),
    ("kvm_irq_routing_entry", "u.irqchip.pin", "u.irqchip.pin"),
}
IOCTLS = [name for name in dir(kvm) if name.startswith("KVM_") and name in {
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_INDEX_LIST", "KVM_CREATE_VCPU",
    "KVM_SET_USER_MEMORY_REGION", "KVM_GET_DIRTY_LOG", "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_SET_GSI_ROUTING", "KVM_IRQFD", "KVM_CREATE_PIT2",
    "KVM_IOEVENTFD", "KVM_SIGNAL_MSI", "KVM_ENABLE_CAP", "KVM_RUN", "KVM_GET_REGS",
    "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_TRANSLATE", "KVM_GET_MSRS",
    "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC",
    "KVM_SET_CPUID2", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_VCPU_EVENTS",
    "KVM_SET_VCPU_EVENTS", "KVM_SET_GUEST_DEBUG"}]


def _offset(ctype: str, path: str) -> int:
    off = 0
    t = kvm.ffi.typeof(f"struct {ctype}")
    for part in path.split("."):
        off += kvm.ffi.offsetof(t, part)
        t = dict(t.fields)[part].type
    return off


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> dict[str, int]:
    if not Path("/usr/include/linux/kvm.h").exists() or shutil.which("cc") is None:
        pytest.skip("needs a C compiler and <linux/kvm.h> (linux-libc-dev)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    for s, fields in STRUCTS.items():
        lines.append(f'printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
        for f in fields:
            lines.append(f'printf("offsetof {s}.{f} %zu\\n", offsetof(struct {s}, {f}));')
    for s, cpath, mine in SUBFIELDS:
        lines.append(f'printf("offsetof {s}.{mine} %zu\\n", offsetof(struct {s}, {cpath}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long){name});')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        kind, key, value = line.split()
        values[f"{kind} {key}"] = int(value)
    return values


def test_struct_sizes(c_values: dict[str, int]) -> None:
    for s in STRUCTS:
        assert kvm.ffi.sizeof(f"struct {s}") == c_values[f"sizeof {s}"], s


def test_field_offsets(c_values: dict[str, int]) -> None:
    for s, fields in STRUCTS.items():
        for f in fields:
            assert _offset(s, f) == c_values[f"offsetof {s}.{f}"], f"{s}.{f}"
    for s, _cpath, mine in SUBFIELDS:
        assert _offset(s, mine) == c_values[f"offsetof {s}.{mine}"], f"{s}.{mine}"


def test_ioctl_numbers(c_values: dict[str, int]) -> None:
    assert len(IOCTLS) == 37
    for name in IOCTLS:
        assert getattr(kvm, name) == c_values[f"ioctl {name}"], name
