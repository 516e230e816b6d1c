"""A KVM virtual machine: its fd, RAM slots, in-kernel interrupt controllers, buses and vCPUs.

This is the machine-independent part: what a TOML file turns into is assembled by
:mod:`vmrun.machine`. Start-up follows kvmtool's idea of init levels: the VM and its memory,
then the interrupt controllers, then devices, then firmware tables and the kernel, then vCPUs.
Ending is one-way: the first :meth:`Vm.request_exit` wins, every vCPU is kicked out of KVM_RUN
and :meth:`Vm.wait` returns the exit code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from vmrun.core import kvm
from vmrun.core.bus import MmioBus, PortBus
from vmrun.core.cpuid import feature_settings, shape_cpuid, supported_cpuid
from vmrun.core.exits import ExitCode
from vmrun.core.irq import CallbackIrqLine
from vmrun.core.memory import GuestMemory
from vmrun.core.vcpu import Vcpu

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000


@dataclass
class VmStats:
    emulated: dict[str, int] = field(default_factory=dict)


@dataclass
class ExitInfo:
    code: ExitCode
    reason: str
    detail: str = ""


def _ignore_signal(signum: int, frame: object) -> None:
    """SIGUSR1 only exists to interrupt KVM_RUN on a vCPU thread."""


class Vm:
    def __init__(self, memory_size: int, ncpus: int = 1, *, irqchip: bool = True,
                 cpu_profile: str = "host", cpu_features: dict[str, bool] | None = None,
                 exit_on_unhandled_io: bool = False) -> None:
        self.kvm_fd = kvm.open_kvm()
        self.fd = -1
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        self.stopping = False
        self.exit_info: ExitInfo | None = None
        self._exit_event = threading.Event()
        self._exit_lock = threading.Lock()
        self.stats = VmStats()
        self.exit_on_unhandled_io = exit_on_unhandled_io
        self.irqchip = irqchip
        self.pio = PortBus()
        self.mmio = MmioBus()
        self._irq_lock = threading.Lock()
        try:
            self.fd = kvm.ioctl(self.kvm_fd, kvm.KVM_CREATE_VM, 0)
            kvm.ioctl(self.fd, kvm.KVM_SET_TSS_ADDR, TSS_ADDR)
            ident = kvm.ffi.new("__u64 *", IDENTITY_MAP_ADDR)
            kvm.ioctl(self.fd, kvm.KVM_SET_IDENTITY_MAP_ADDR, ident)
            if irqchip:
                kvm.ioctl(self.fd, kvm.KVM_CREATE_IRQCHIP)
                pit = kvm.ffi.new("struct kvm_pit_config *")
                pit.flags = kvm.KVM_PIT_SPEAKER_DUMMY
                kvm.ioctl(self.fd, kvm.KVM_CREATE_PIT2, pit)
            self.memory = GuestMemory.for_size(memory_size)
            for slot in self.memory.slots:
                region = kvm.ffi.new("struct kvm_userspace_memory_region *")
                region.slot = slot.index
                region.guest_phys_addr = slot.gpa
                region.memory_size = slot.size
                region.userspace_addr = self.memory.host_address(slot)
                kvm.ioctl(self.fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
            features = feature_settings(cpu_profile, cpu_features or {})
            supported = supported_cpuid(self.kvm_fd)
            for i in range(ncpus):
                vcpu = Vcpu(self, i)
                self.vcpus.append(vcpu)
                vcpu.set_cpuid(shape_cpuid(supported, i, ncpus, features))
                vcpu.setup_boot_msrs()
                vcpu.setup_fpu()
                if irqchip:
                    vcpu.setup_lapic()
        except BaseException:
            self.close()
            raise

    # -- interrupts ----------------------------------------------------------------
    def set_irq_line(self, gsi: int, level: int) -> None:
        """Drive an input of the in-kernel PIC and IOAPIC (ISA IRQs are GSIs 0-15)."""
        irq = kvm.ffi.new("struct kvm_irq_level *")
        irq.irq = gsi
        irq.level = level
        kvm.ioctl(self.fd, kvm.KVM_IRQ_LINE, irq)

    def irq_line(self, gsi: int) -> CallbackIrqLine:
        return CallbackIrqLine(gsi, self.set_irq_line)

    # -- lifetime -------------------------------------------------------------------
    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, _ignore_signal)
        for vcpu in self.vcpus:
            vcpu.start()

    def request_exit(self, code: ExitCode, reason: str, detail: str = "") -> None:
        """End the VM (first caller wins); safe from any thread."""
        with self._exit_lock:
            if self.exit_info is None:
                self.exit_info = ExitInfo(ExitCode(code), reason, detail)
            self.stopping = True
        for vcpu in self.vcpus:
            if vcpu.thread is not threading.current_thread():
                vcpu.kick()
        self._exit_event.set()

    def wait(self, timeout: float | None = None) -> ExitInfo | None:
        """Block until the VM ends; returns how it ended (None on timeout)."""
        if not self._exit_event.wait(timeout):
            return None
        for vcpu in self.vcpus:
            t = vcpu.thread
            while t is not None and t.is_alive():
                vcpu.kick()
                t.join(0.05)
        return self.exit_info

    def close(self) -> None:
        for vcpu in self.vcpus:
            try:
                vcpu.close()
            except OSError as e:
                print(f"vmrun: closing vcpu{vcpu.index}: {e}", file=sys.stderr)
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.kvm_fd >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1
