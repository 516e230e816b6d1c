"""The KVM API through cffi (ABI mode: no compiler needed at run time).

The struct layouts below are the kernel's (``<linux/kvm.h>``, x86-64); ``tests/test_kvm_abi.py``
compiles a C program against the installed header and checks every size, offset and ioctl
number. ``ioctl`` goes through libc via cffi, which releases the GIL for the call, so a vCPU
thread sitting in ``KVM_RUN`` does not hold up the rest of the VMM.
"""

from __future__ import annotations

import os

import cffi

ffi = cffi.FFI()
ffi.cdef(r"""
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;
typedef int32_t __s32;

struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr;
};
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector;
    __u8 type, present, dpl, db, s, l, g, avl; __u8 unusable; __u8 padding;
};
struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8; __u64 efer; __u64 apic_base; __u64 interrupt_bitmap[4];
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u8 pad1; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; __u32 pad2;
};
struct kvm_run_io { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; };
struct kvm_run_mmio { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; };
struct kvm_run_internal { __u32 suberror; __u32 ndata; __u64 data[16]; };
struct kvm_run_system_event { __u32 type; __u32 ndata; __u64 data[16]; };
struct kvm_run_fail_entry { __u64 hardware_entry_failure_reason; __u32 cpu; };
struct kvm_run_ex { __u32 exception; __u32 error_code; };
struct kvm_run {
    __u8 request_interrupt_window; __u8 immediate_exit; __u8 padding1[6];
    __u32 exit_reason; __u8 ready_for_interrupt_injection; __u8 if_flag; __u16 flags;
    __u64 cr8; __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct kvm_run_fail_entry fail_entry;
        struct kvm_run_ex ex;
        struct kvm_run_io io;
        struct kvm_run_mmio mmio;
        struct kvm_run_internal internal;
        struct kvm_run_system_event system_event;
        struct { struct kvm_debug_exit_arch arch; } debug;
        char padding[256];
    };
    __u64 kvm_valid_regs; __u64 kvm_dirty_regs;
    char s_padding[2048];
};
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags; __u32 eax; __u32 ebx; __u32 ecx; __u32 edx;
    __u32 padding[3];
};
struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };
struct kvm_pit_config { __u32 flags; __u32 pad[15]; };
struct kvm_irq_level { __u32 irq; __u32 level; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; __u8 pad[16]; };
struct kvm_ioeventfd {
    __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; __u8 pad[36];
};
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid;
                 __u8 pad[12]; };
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 devid; };
struct kvm_irq_routing_entry {
    __u32 gsi; __u32 type; __u32 flags; __u32 pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        __u32 upad[8];
    } u;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_translation {
    __u64 linear_address; __u64 physical_address; __u8 valid; __u8 writeable; __u8 usermode;
    __u8 pad[5];
};
struct kvm_vcpu_events_exception { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending;
                                   __u32 error_code; };
struct kvm_vcpu_events_interrupt { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; };
struct kvm_vcpu_events_nmi { __u8 injected; __u8 pending; __u8 masked; __u8 pad; };
struct kvm_vcpu_events_smi { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; };
struct kvm_vcpu_events {
    struct kvm_vcpu_events_exception exception;
    struct kvm_vcpu_events_interrupt interrupt;
    struct kvm_vcpu_events_nmi nmi;
    __u32 sipi_vector; __u32 flags;
    struct kvm_vcpu_events_smi smi;
    __u8 triple_fault_pending;
    __u8 reserved[26];
    __u8 exception_has_payload;
    __u64 exception_payload;
};
struct kvm_dirty_log { __u32 slot; __u32 padding1; __u64 dirty_bitmap; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]; };
struct kvm_guest_debug_arch { __u64 debugreg[8]; };
struct kvm_guest_debug { __u32 control; __u32 pad; struct kvm_guest_debug_arch arch; };
struct kvm_debug_exit_arch { __u32 exception; __u32 pad; __u64 pc; __u64 dr6; __u64 dr7; };

int ioctl(int fd, unsigned long request, ...);
""")
libc = ffi.dlopen(None)

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, ctype: str) -> int:
    return _ioc(1, nr, ffi.sizeof(ctype))


def _ior(nr: int, ctype: str) -> int:
    return _ioc(2, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(3, nr, ffi.sizeof(ctype))


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "__u64")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_TRANSLATE = _iowr(0x85, "struct kvm_translation")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_HW_BP = 0x20000

# Exit reasons.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
EXIT_REASON_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
}
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# Capabilities.
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_PIT2 = 33
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204

KVM_PIT_SPEAKER_DUMMY = 1
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_VCPUEVENT_VALID_NMI_PENDING = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1
KVM_VCPUEVENT_VALID_SHADOW = 1 << 2
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3


class KvmError(OSError):
    """An ioctl on /dev/kvm failed; carries the ioctl's name."""


_IOCTL_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_") and
                isinstance(v, int) and (v >> 8) & 0xFF == KVMIO}


def ioctl(fd: int, request: int, arg: object = 0) -> int:
    """ioctl(2) through libc; raises KvmError with the ioctl's name on failure.

    ``arg`` is an int or a cffi pointer. The call releases the GIL.
    """
    if isinstance(arg, int):
        ret = libc.ioctl(fd, request, ffi.cast("unsigned long", arg))
    else:
        ret = libc.ioctl(fd, request, arg)
    if ret < 0:
        err = ffi.errno
        name = _IOCTL_NAMES.get(request, hex(request))
        raise KvmError(err, f"{name}: {os.strerror(err)}")
    return ret


def open_kvm() -> int:
    """Open /dev/kvm and check the API version, with an error a user can act on."""
    from vmrun.errors import VmrunError

    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VmrunError("/dev/kvm does not exist: this host has no KVM (load kvm_intel or "
                         "kvm_amd, or enable nested virtualization)") from None
    except PermissionError:
        raise VmrunError("/dev/kvm: permission denied (run as root or join the kvm group)") \
            from None
    version = ioctl(fd, KVM_GET_API_VERSION)
    if version != 12:
        os.close(fd)
        raise VmrunError(f"/dev/kvm: unsupported KVM API version {version} (need 12)")
    return fd


def check_extension(fd: int, cap: int) -> int:
    return libc.ioctl(fd, KVM_CHECK_EXTENSION, ffi.cast("unsigned long", cap))
