"""CPUID feature names -> where the bit lives, and the "compat" CPU profile.

Names are the ones Linux prints in ``/proc/cpuinfo`` (so a user can copy them from the host or
from the guest, and the same names work in the guest's ``clearcpuid=``). Each maps to
``(leaf, subleaf, register, bit)``. Exceptions, because Linux has no such name for the bit:

- ``sse3`` is an alias of ``pni`` (what cpuinfo prints) because everyone else calls it SSE3.
- ``invtsc`` is CPUID 0x80000007 EDX bit 8, the invariant TSC. Linux does not print the bit
  itself; it derives ``constant_tsc`` and ``nonstop_tsc`` from it (and from the CPU model), so
  neither of those names would say exactly which bit we flip. QEMU and libvirt call it invtsc.
- ``kvm_pv_*`` are KVM's paravirtual feature bits (leaf 0x40000001 EAX), named after the
  ``KVM_FEATURE_PV_*`` constants.

The compat profile exists because a software-assisted nested KVM (kvm-pvm) runs the guest
kernel in a mode where KVM's instruction emulator must handle some instructions, and it cannot
emulate the ones behind these bits: the guest would take #UD or hang where real hardware works.
Hiding the bits makes Linux pick its fallbacks. It also shows XSAVEERPTR, which tells Linux
FXSAVE/XSAVE always store the FPU error pointers, so its FPU restore path skips the
FNCLEX/EMMS/FILD sequence that those hosts cannot emulate either.
"""

from __future__ import annotations

REGISTERS = ("eax", "ebx", "ecx", "edx")

FEATURES: dict[str, tuple[int, int, str, int]] = {
    # leaf 1 EDX
    "fpu": (1, 0, "edx", 0), "vme": (1, 0, "edx", 1), "de": (1, 0, "edx", 2),
    "pse": (1, 0, "edx", 3), "tsc": (1, 0, "edx", 4), "msr": (1, 0, "edx", 5),
    "pae": (1, 0, "edx", 6), "mce": (1, 0, "edx", 7), "cx8": (1, 0, "edx", 8),
    "apic": (1, 0, "edx", 9), "sep": (1, 0, "edx", 11), "mtrr": (1, 0, "edx", 12),
    "pge": (1, 0, "edx", 13), "mca": (1, 0, "edx", 14), "cmov": (1, 0, "edx", 15),
    "pat": (1, 0, "edx", 16), "pse36": (1, 0, "edx", 17), "clflush": (1, 0, "edx", 19),
    "mmx": (1, 0, "edx", 23), "fxsr": (1, 0, "edx", 24), "sse": (1, 0, "edx", 25),
    "sse2": (1, 0, "edx", 26), "ht": (1, 0, "edx", 28),
    # leaf 1 ECX
    "pni": (1, 0, "ecx", 0), "sse3": (1, 0, "ecx", 0), "pclmulqdq": (1, 0, "ecx", 1),
    "monitor": (1, 0, "ecx", 3), "ssse3": (1, 0, "ecx", 9), "fma": (1, 0, "ecx", 12),
    "cx16": (1, 0, "ecx", 13), "pcid": (1, 0, "ecx", 17), "sse4_1": (1, 0, "ecx", 19),
    "sse4_2": (1, 0, "ecx", 20), "x2apic": (1, 0, "ecx", 21), "movbe": (1, 0, "ecx", 22),
    "popcnt": (1, 0, "ecx", 23), "tsc_deadline_timer": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25), "xsave": (1, 0, "ecx", 26), "avx": (1, 0, "ecx", 28),
    "f16c": (1, 0, "ecx", 29), "rdrand": (1, 0, "ecx", 30), "hypervisor": (1, 0, "ecx", 31),
    # leaf 7 subleaf 0 EBX
    "fsgsbase": (7, 0, "ebx", 0), "bmi1": (7, 0, "ebx", 3), "hle": (7, 0, "ebx", 4),
    "avx2": (7, 0, "ebx", 5), "smep": (7, 0, "ebx", 7), "bmi2": (7, 0, "ebx", 8),
    "erms": (7, 0, "ebx", 9), "invpcid": (7, 0, "ebx", 10), "rtm": (7, 0, "ebx", 11),
    "avx512f": (7, 0, "ebx", 16), "avx512dq": (7, 0, "ebx", 17), "rdseed": (7, 0, "ebx", 18),
    "adx": (7, 0, "ebx", 19), "smap": (7, 0, "ebx", 20), "clflushopt": (7, 0, "ebx", 23),
    "clwb": (7, 0, "ebx", 24), "avx512cd": (7, 0, "ebx", 28), "sha_ni": (7, 0, "ebx", 29),
    "avx512bw": (7, 0, "ebx", 30), "avx512vl": (7, 0, "ebx", 31),
    # leaf 7 subleaf 0 ECX / EDX
    "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3), "ospke": (7, 0, "ecx", 4),
    "gfni": (7, 0, "ecx", 8), "vaes": (7, 0, "ecx", 9), "vpclmulqdq": (7, 0, "ecx", 10),
    "la57": (7, 0, "ecx", 16), "rdpid": (7, 0, "ecx", 22), "fsrm": (7, 0, "edx", 4),
    # leaf 0xD subleaf 1 EAX
    "xsaveopt": (0xD, 1, "eax", 0), "xsavec": (0xD, 1, "eax", 1), "xsaves": (0xD, 1, "eax", 3),
    # leaf 0x80000001
    "lahf_lm": (0x80000001, 0, "ecx", 0), "abm": (0x80000001, 0, "ecx", 5),   # abm = LZCNT
    "sse4a": (0x80000001, 0, "ecx", 6), "syscall": (0x80000001, 0, "edx", 11),
    "nx": (0x80000001, 0, "edx", 20), "pdpe1gb": (0x80000001, 0, "edx", 26),
    "rdtscp": (0x80000001, 0, "edx", 27), "lm": (0x80000001, 0, "edx", 29),
    # leaf 0x80000007 EDX: invariant TSC (see the module docstring for the name)
    "invtsc": (0x80000007, 0, "edx", 8),
    # leaf 0x80000008 EBX: FXSAVE/XSAVE always save the FPU error pointers
    "xsaveerptr": (0x80000008, 0, "ebx", 2),
    # KVM paravirtual features (leaf 0x40000001 EAX) whose hypercalls never return on kvm-pvm
    "kvm_pv_unhalt": (0x40000001, 0, "eax", 7),
    "kvm_pv_send_ipi": (0x40000001, 0, "eax", 11),
    "kvm_pv_sched_yield": (0x40000001, 0, "eax", 13),
    # ... and the ones that share memory with the host (KVM_FEATURE_* without the prefix)
    "kvm_async_pf": (0x40000001, 0, "eax", 4),
    "kvm_steal_time": (0x40000001, 0, "eax", 5),
    "kvm_pv_eoi": (0x40000001, 0, "eax", 6),
    "kvm_pv_tlb_flush": (0x40000001, 0, "eax", 9),
    "kvm_async_pf_vmexit": (0x40000001, 0, "eax", 10),
    "kvm_async_pf_int": (0x40000001, 0, "eax", 14),
}

# Names that share a bit with another name on purpose; everything else has a bit of its own.
ALIASES = {"sse3": "pni"}

COMPAT_OFF = (
    "smap", "smep", "umip", "pku", "ospke", "fsgsbase", "rdpid", "rdrand", "rdseed", "avx",
    "avx2", "avx512f", "popcnt", "rdtscp", "clflushopt", "clwb", "sha_ni", "aes", "pclmulqdq",
    "sse4_1", "sse4_2", "ssse3", "movbe", "bmi1", "bmi2", "adx", "invpcid", "pcid", "fsrm",
    "f16c", "fma", "xsave", "xsaves", "xsavec", "xsaveopt", "gfni", "vaes", "vpclmulqdq",
    "cx16", "hle", "rtm", "kvm_pv_unhalt", "kvm_pv_send_ipi", "kvm_pv_sched_yield",
)
# What profile = "compat" applies before the file's [cpu.features] overrides.
COMPAT_PROFILE: dict[str, bool] = {name: False for name in COMPAT_OFF} | {"xsaveerptr": True}


def feature_names() -> list[str]:
    """Every name ``[cpu.features]`` accepts, sorted (for error messages and documentation)."""
    return sorted(FEATURES)
