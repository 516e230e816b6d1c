"""CPUID for each vCPU: KVM's supported set, shaped by the machine's CPU profile.

``host`` passes through what KVM supports; ``compat`` turns off the features whose
instructions a software-assisted KVM (such as kvm-pvm) cannot emulate in guest kernel mode, and
shows XSAVEERPTR so Linux does not take its FNCLEX/EMMS/FILD FPU-restore path. Explicit
``[cpu.features]`` overrides apply last. Per-vCPU topology (APIC ids) is filled in here too.
"""

from __future__ import annotations

from vmrun.core import kvm
from vmrun.core.cpufeatures import COMPAT_PROFILE, FEATURES

REG_NAMES = ("eax", "ebx", "ecx", "edx")
# Leaves that carry a per-subleaf "index" which KVM matches (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


def supported_cpuid(kvm_fd: int) -> list[dict[str, int]]:
    """KVM_GET_SUPPORTED_CPUID as a list of plain dicts (function, index, flags, eax..edx)."""
    nent = 256
    while True:
        buf = kvm.ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
        buf_nent = kvm.ffi.cast("struct kvm_cpuid2 *", buf)
        buf_nent.nent = nent
        try:
            kvm.ioctl(kvm_fd, kvm.KVM_GET_SUPPORTED_CPUID, buf_nent)
            break
        except kvm.KvmError as e:
            if e.errno != 7 or nent > 4096:  # E2BIG
                raise
            nent *= 2
    out = []
    for i in range(buf_nent.nent):
        e = buf_nent.entries[i]
        out.append({"function": e.function, "index": e.index, "flags": e.flags,
                    "eax": e.eax, "ebx": e.ebx, "ecx": e.ecx, "edx": e.edx})
    return out


def feature_settings(profile: str, overrides: dict[str, bool]) -> dict[str, bool]:
    settings: dict[str, bool] = {}
    if profile == "compat":
        settings.update(COMPAT_PROFILE)
    settings.update(overrides)
    return settings


def shape_cpuid(entries: list[dict[str, int]], apic_id: int, ncpus: int,
                features: dict[str, bool]) -> list[dict[str, int]]:
    """A copy of ``entries`` for the vCPU with ``apic_id``, with ``features`` applied."""
    out = [dict(e) for e in entries]
    by_leaf = {(e["function"], e["index"]): e for e in out}

    def leaf(function: int, index: int = 0) -> dict[str, int] | None:
        return by_leaf.get((function, index))

    for name, on in features.items():
        fn, sub, reg, bit = FEATURES[name]
        e = leaf(fn, sub)
        if e is None:
            if not on:
                continue
            e = {"function": fn, "index": sub, "flags": 0, "eax": 0, "ebx": 0, "ecx": 0,
                 "edx": 0}
            out.append(e)
            by_leaf[(fn, sub)] = e
        if on:
            e[reg] |= 1 << bit
        else:
            e[reg] &= ~(1 << bit)

    if (e := leaf(1)) is not None:
        e["ebx"] = (e["ebx"] & 0x0000FFFF) | (apic_id << 24) | (min(ncpus, 255) << 16)
        e["ecx"] |= 1 << 31                                   # hypervisor present
        if ncpus > 1:
            e["edx"] |= 1 << 28                               # HTT: several logical CPUs
        if not features.get("xsave", True):
            e["ecx"] &= ~(1 << 27)                            # OSXSAVE follows XSAVE
    if not features.get("xsave", True):
        out = [e for e in out if e["function"] != 0xD]
    for e in out:
        if e["function"] in (0xB, 0x1F):
            e["edx"] = apic_id
        if e["function"] == 0x80000008:
            # ECX[7:0]: number of cores - 1 (AMD topology for ncpus logical processors).
            e["ecx"] = (e["ecx"] & ~0xFF) | (ncpus - 1)
    return out


def set_vcpu_cpuid(vcpu_fd: int, entries: list[dict[str, int]]) -> None:
    n = len(entries)
    buf = kvm.ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
    buf.nent = n
    for i, e in enumerate(entries):
        d = buf.entries[i]
        d.function, d.index, d.flags = e["function"], e["index"], e["flags"]
        d.eax, d.ebx, d.ecx, d.edx = e["eax"], e["ebx"], e["ecx"], e["edx"]
    kvm.ioctl(vcpu_fd, kvm.KVM_SET_CPUID2, buf)
