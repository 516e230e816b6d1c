"""KVM tests with tiny hand-made guests (a few instructions each at CPL0).

They check the exit dispatch (PIO, string PIO, MMIO), the bhyve exit codes for halt and triple
fault, INT3 delivered as #BP when KVM cannot emulate it, the x87 and MXCSR instructions vmrun
finishes itself, multi-vCPU start through the in-kernel LAPIC (INIT/SIPI), and MSI / MSI-X delivery
through KVM GSI routes and irqfds.
"""

from __future__ import annotations

import os
import threading

import pytest

from vmrun.core.exits import ExitCode
from vmrun.testing import RecordingDevice
from vmrun.testing import guests as g

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm"),
]


Recorder = RecordingDevice


def run(vm, timeout: float = 20.0):
    try:
        vm.start()
        info = vm.wait(timeout)
        assert info is not None, "guest did not finish"
        return info
    finally:
        vm.close()


def test_pio_out_in_and_halt_exit_code() -> None:
    dev = Recorder(value=0x5A)
    code = (g.report(0x500, 0x12345678) + g.mov_dx(0x502) + g.in_al_dx()
            + g.mov_dx(0x501) + g.out_dx_al() + g.HLT)
    vm = g.long_mode_vm(code)
    vm.pio.insert(dev, 0x500, 4)
    info = run(vm)
    assert info.code == ExitCode.HALT
    assert dev.writes == [(0, 4, 0x12345678), (1, 1, 0x5A)]
    assert dev.reads == [(2, 1)]


def test_string_pio_rep_outsb() -> None:
    dev = Recorder()
    data = 0x50000
    # mov esi, data; mov ecx, 5; mov dx, 0x510; rep outsb; hlt
    code = (b"\xbe" + data.to_bytes(4, "little") + b"\xb9\x05\x00\x00\x00" + g.mov_dx(0x510)
            + b"\xf3\x6e" + g.HLT)
    vm = g.long_mode_vm(code)
    vm.memory.write(data, b"hello")
    vm.pio.insert(dev, 0x510, 1)
    info = run(vm)
    assert info.code == ExitCode.HALT
    assert bytes(v for _, _, v in dev.writes) == b"hello"


def test_mmio_read_and_write_dispatch() -> None:
    dev = Recorder(value=0xCAFEF00D)
    base = 0x4000_0000  # below 2 GiB: a disp32 that does not sign-extend
    code = (g.mov_eax(0xA5A5A5A5) + g.mov_abs_eax_store(base + 8) + g.mov_abs_eax_load(base + 4)
            + g.mov_dx(0x520) + g.out_dx_eax() + g.HLT)
    vm = g.long_mode_vm(code)
    vm.mmio.insert(dev, base, 0x1000)
    out = Recorder()
    vm.pio.insert(out, 0x520, 4)
    info = run(vm)
    assert info.code == ExitCode.HALT
    assert dev.writes == [(8, 4, 0xA5A5A5A5)]
    assert dev.reads == [(4, 4)]
    assert out.writes == [(0, 4, 0xCAFEF00D)]


def test_unclaimed_port_reads_all_ones() -> None:
    out = Recorder()
    code = g.mov_dx(0x6F0) + g.in_al_dx() + g.mov_dx(0x520) + g.out_dx_al() + g.HLT
    vm = g.long_mode_vm(code)
    vm.pio.insert(out, 0x520, 1)
    info = run(vm)
    assert info.code == ExitCode.HALT
    assert out.writes == [(0, 1, 0xFF)]


def test_triple_fault_exits_3() -> None:
    vm = g.long_mode_vm(g.UD2, idt=False)
    vm.vcpus[0]  # an IDT of limit 7 holds no valid gate: #UD -> #GP -> #DF -> shutdown
    info = run(vm)
    assert info.code == ExitCode.TRIPLE_FAULT
    assert "triple fault" in info.reason


def test_int3_reaches_the_guest_breakpoint_handler() -> None:
    dev = Recorder()
    # The #BP handler reports the RIP it was given, then returns to the code after int3.
    handler = g.mov_rax_rsp_top() + g.mov_dx(0x530) + g.out_dx_eax() + g.IRETQ
    code = g.INT3 + g.report(0x531, 0x77) + g.HLT
    vm = g.long_mode_vm(code, {3: handler})
    vm.pio.insert(dev, 0x530, 2)
    info = run(vm)
    assert info.code == ExitCode.HALT
    assert dev.writes == [(0, 4, g.CODE + 1), (1, 4, 0x77)]


def test_x87_fnclex_emms_finish() -> None:
    """fnclex and emms at CPL0 complete, whether KVM runs them or vmrun emulates them."""
    dev = Recorder()
    code = b"\xdb\xe2" + b"\x0f\x77" + b"\x9b\xdb\xe2" + g.report(0x540, 1) + g.HLT
    vm = g.long_mode_vm(code)
    vm.pio.insert(dev, 0x540, 1)
    info = run(vm)
    assert info.code == ExitCode.HALT, info.reason
    assert dev.writes == [(0, 4, 1)]


def mxcsr_vm(value: int, *, sse: bool = True):
    """A guest that loads ``value`` into MXCSR from [rsp-0x40] (as Linux's
    kernel_fpu_begin does, with an rsp-based operand), stores MXCSR to [rsp-0x3c] and
    reports it on port 0x550; #GP, #UD and #NM report their vector on port 0x551."""
    code = (b"\xc7\x44\x24\xc0" + value.to_bytes(4, "little")    # mov dword [rsp-0x40], value
            + b"\x0f\xae\x54\x24\xc0"                           # ldmxcsr [rsp-0x40]
            + b"\x0f\xae\x5c\x24\xc4"                           # stmxcsr [rsp-0x3c]
            + b"\x8b\x44\x24\xc4"                                # mov eax, [rsp-0x3c]
            + g.mov_dx(0x550) + g.out_dx_eax() + g.HLT)
    handlers = {v: g.report(0x551, v) + g.HLT for v in (6, 7, 13)}
    vm = g.long_mode_vm(code, handlers)
    vcpu = vm.vcpus[0]
    sregs = vcpu.get_sregs()
    if sse:
        sregs.cr4 |= 1 << 9                                     # CR4.OSFXSR
    vcpu.set_sregs(sregs)
    return vm


@pytest.mark.parametrize("value", [0x1F80, 0x9FC0])
def test_ldmxcsr_stmxcsr_finish(value: int) -> None:
    """ldmxcsr/stmxcsr at CPL0 with a stack operand (kvm-pvm's emulator cannot do them;
    vmrun finishes them): the value loaded is the value stored."""
    vm = mxcsr_vm(value)
    dev = Recorder()
    vm.pio.insert(dev, 0x550, 2)
    info = run(vm)
    assert info.code == ExitCode.HALT, info.reason
    assert dev.writes == [(0, 4, value)]


def guest_xsave(vm):
    """The BSP's XSAVE area as KVM holds it (what the guest's next XRSTOR loads)."""
    from vmrun.core import kvm, kvmstate
    x = kvmstate.ffi.new("struct kvm_xsave *")
    kvm.ioctl(vm.vcpus[0].fd, kvmstate.KVM_GET_XSAVE, x)
    return x


def test_ldmxcsr_reaches_the_guests_fpu_state() -> None:
    """What ldmxcsr loaded is the guest's MXCSR (XSAVE area read back by the host), not only
    what vmrun's own stmxcsr gives back."""
    vm = mxcsr_vm(0x9FC0)
    try:
        vm.start()
        info = vm.wait(20)
        assert info is not None and info.code == ExitCode.HALT, info
        assert guest_xsave(vm).region[6] == 0x9FC0
    finally:
        vm.close()


def test_fninit_resets_the_x87_state_the_guest_sees() -> None:
    """fninit (KVM's emulator cannot do it on kvm-pvm; OVMF and Linux use it) resets what the
    guest's own fnstcw/fnstsw then read: control word 0x37F, status 0."""
    from vmrun.core import kvm, kvmstate
    # fninit; fnstcw [rsp-0x40]; movzx eax, word [rsp-0x40]; out 0x560;
    # fnstsw [rsp-0x3e]; movzx eax, word [rsp-0x3e]; out 0x561
    code = (b"\xdb\xe3" + b"\xd9\x7c\x24\xc0" + b"\x0f\xb7\x44\x24\xc0"
            + g.mov_dx(0x560) + g.out_dx_eax() + b"\xdd\x7c\x24\xc2"
            + b"\x0f\xb7\x44\x24\xc2" + g.mov_dx(0x561) + g.out_dx_eax() + g.HLT)
    vm = g.long_mode_vm(code)
    x = guest_xsave(vm)
    x.region[0] = 0x0081_027F                  # fcw 0x27F, fsw 0x81 (IE, ES): not reset
    x.region[128] |= 1
    kvm.ioctl(vm.vcpus[0].fd, kvmstate.KVM_SET_XSAVE, x)
    dev = Recorder()
    vm.pio.insert(dev, 0x560, 2)
    info = run(vm)
    assert info.code == ExitCode.HALT, info.reason
    assert dev.writes == [(0, 4, 0x37F), (1, 4, 0)]


@pytest.mark.parametrize("mnemonic, fcw, fsw, ftw", [
    ("fninit", 0x37F, 0, 0), ("fnclex", 0x27F, 0x3800, 0xFF), ("emms", 0x27F, 0x3881, 0)])
def test_vmrun_finishes_x87_control_instructions_in_the_xsave_area(
        mnemonic: str, fcw: int, fsw: int, ftw: int) -> None:
    """vmrun's own x87 finishing (for where KVM's emulator gives up), checked on the state KVM
    gives the guest: fcw 0x27F, fsw 0x3881 (TOP=7, ES, IE) and all tags valid before."""
    from vmrun.core import emulate, kvm, kvmstate
    vm = g.long_mode_vm(g.HLT)
    try:
        vcpu = vm.vcpus[0]
        x = guest_xsave(vm)
        x.region[0] = 0x3881_027F
        x.region[1] = 0xFF
        x.region[128] |= 1
        kvm.ioctl(vcpu.fd, kvmstate.KVM_SET_XSAVE, x)
        regs = vcpu.get_regs()
        rip = regs.rip
        emulate.emulate(vcpu, mnemonic, 2, regs)
        after = guest_xsave(vm)
        assert (after.region[0] & 0xFFFF, after.region[0] >> 16, after.region[1] & 0xFF) == \
            (fcw, fsw, ftw)
        assert vcpu.get_regs().rip == rip + 2
    finally:
        vm.close()


def test_ldmxcsr_reserved_bits_and_sse_off_fault_as_the_cpu_does() -> None:
    for value, sse, vector in ((0x10000, True, 13), (0x1F80, False, 6)):
        vm = mxcsr_vm(value, sse=sse)
        dev = Recorder()
        vm.pio.insert(dev, 0x550, 2)
        info = run(vm)
        assert info.code == ExitCode.HALT, info.reason
        assert dev.writes == [(1, 4, vector)], (value, sse)


def test_second_vcpu_starts_on_init_sipi() -> None:
    """The BSP wakes the AP through the in-kernel LAPIC; the AP runs real-mode code."""
    got = threading.Event()

    class ApPort(Recorder):
        def write(self, offset: int, size: int, value: int) -> None:
            super().write(offset, size, value)
            if value == 0x42:
                got.set()
                vm.request_exit(ExitCode.POWER_OFF, "AP reported")

    icr_lo, icr_hi = 0xFEE00300, 0xFEE00310

    def store(addr: int, value: int) -> bytes:
        # mov eax, addr; mov dword [rax], value
        return g.mov_eax(addr) + b"\xc7\x00" + value.to_bytes(4, "little")

    code = (store(icr_hi, 1 << 24) + store(icr_lo, 0x4500)      # INIT to APIC id 1
            + store(icr_hi, 1 << 24) + store(icr_lo, 0x4608)    # SIPI, vector 0x08 -> 0x8000
            + g.HLT + g.JMP_SELF)
    vm = g.long_mode_vm(code, irqchip=True, ncpus=2)
    vm.memory.write(0x8000, b"\xb0\x42\xe6\xf6\xf4\xeb\xfd")      # mov al,0x42; out 0xf6,al; hlt
    ap = ApPort()
    vm.pio.insert(ap, 0xF6, 1)
    info = run(vm, timeout=30)
    assert got.is_set(), info.reason
    assert info.code == ExitCode.POWER_OFF


@pytest.mark.parametrize("kind", ["msi", "msix"])
def test_msi_and_msix_reach_the_guest_through_irqfd(kind: str) -> None:
    """A device's MSI / MSI-X vector, routed by a KVM GSI route and raised through its irqfd,
    arrives in the guest as the interrupt vector the message names (vector number in the MSI
    data's low bits for plain MSI)."""
    from vmrun.core.pci import BAR_MEM32, BarSpec, PciDevice, PciRoot

    class Dev(PciDevice):
        vendor_id, device_id = 0x1234, 0x5678
        bars = [BarSpec(0, 0x1000, BAR_MEM32)]
        msi_vectors = 2 if kind == "msi" else 0
        msix_vectors, msix_bar = (2, 1) if kind == "msix" else (0, None)

    seen: list[int] = []

    class Ready(Recorder):
        def write(self, offset: int, size: int, value: int) -> None:
            # The guest enabled its LAPIC and interrupts: raise vector 1 from "the device".
            dev.irq.trigger(1)

    class Got(Recorder):
        def write(self, offset: int, size: int, value: int) -> None:
            seen.append(value)
            vm.request_exit(ExitCode.POWER_OFF, "interrupt handled")

    def store(addr: int, value: int) -> bytes:
        return g.mov_eax(addr) + b"\xc7\x00" + value.to_bytes(4, "little")

    code = (store(0xFEE000F0, 0x1FF)                        # LAPIC software enable
            + g.mov_al(1) + g.out_imm_al(0xF7) + b"\xfb"     # ready; sti
            + g.HLT + b"\xeb\xfd")                            # hlt; jmp hlt
    handlers = {v: g.report(0xF6, v) + g.CLI + g.HLT for v in (0x50, 0x51, 0x52)}
    vm = g.long_mode_vm(code, handlers, irqchip=True)
    root = PciRoot(vm)
    dev = Dev()
    root.add(dev, 3)
    root.assign_bars()                                       # the core wires the vectors
    if kind == "msi":
        cap = dev.irq.msi.cap_offset
        root.config_write(3, 0, cap + 4, 4, 0xFEE00000)
        root.config_write(3, 0, cap + 12, 2, 0x0050)
        root.config_write(3, 0, cap + 2, 2, 0x0011)          # enable, 2 vectors
    else:
        msix = dev.irq.msix
        msix.table_write(16 + 0, 4, 0xFEE00000)
        msix.table_write(16 + 8, 4, 0x0051)
        msix.table_write(16 + 12, 4, 0)                       # unmask vector 1
        root.config_write(3, 0, msix.cap_offset + 2, 2, 0x8000)      # enable
    vm.pio.insert(Ready(), 0xF7, 1)
    vm.pio.insert(Got(), 0xF6, 1)
    info = run(vm, timeout=30)
    assert info.code == ExitCode.POWER_OFF, info.reason
    assert seen == [0x51]
