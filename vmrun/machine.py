"""Turn a validated machine file into a running VM: platform devices, firmware tables, kernel.

One :class:`Machine` is one boot. A guest reset with ``on_reboot = "restart"`` ends it and the
runner builds the next one from the same configuration and serial backends, so every reboot
starts from a clean VM (fresh RAM, fresh device state), as a power cycle would.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmrun.block.image_tools import remove_created
from vmrun.chardev import Backend
from vmrun.cloudinit import seed_device
from vmrun.config import MachineConfig
from vmrun.core import layout
from vmrun.core.acpi import AcpiPlatform, build_acpi
from vmrun.core.boot import load_kernel
from vmrun.core.exits import ExitCode
from vmrun.core.host import HostContext
from vmrun.core.pci import ConfigMechanism1, Ecam, PciRoot
from vmrun.core.pci_acpi import ecam_allocation, ecam_reservation_aml, pci_root_aml
from vmrun.core.smbios import build_smbios
from vmrun.core.syscall_fixup import needed as syscall_fixup_needed
from vmrun.core.vm import ExitInfo, Vm
from vmrun.devices.acpi_pm import AcpiPm, ResetControl
from vmrun.devices.debug import BootMarker, DebugCon, DebugExit
from vmrun.devices.i8042 import I8042
from vmrun.devices.ps2_input import Ps2InputSink
from vmrun.devices.rtc import CmosRtc
from vmrun.devices.uart import Uart16550
from vmrun.plugins import get_registry
from vmrun.plugins.placement import place_devices
from vmrun.plugins.registry import DeviceContext

COM_PORTS = {
    "com1": ("COM1", layout.COM1_PORT, layout.COM1_IRQ),
    "com2": ("COM2", layout.COM2_PORT, layout.COM2_IRQ),
    "com3": ("COM3", layout.COM3_PORT, layout.COM3_IRQ),
    "com4": ("COM4", layout.COM4_PORT, layout.COM4_IRQ),
}


class _DiscardInput:
    """The input side of the output-only debug console: typed bytes go nowhere."""

    def feed(self, data: bytes) -> int:
        return len(data)


_DISCARD_INPUT = _DiscardInput()


@dataclass
class BootLog:
    """Milestones the guest reported on the boot-marker port, seconds since process start."""

    start: float = field(default_factory=time.monotonic)
    markers: list[tuple[int, float]] = field(default_factory=list)

    def mark(self, value: int, when: float) -> None:
        self.markers.append((value, when - self.start))


class Machine:
    """One boot. ``host`` is the run's host side (event loop, input hub, host resources that
    outlive a reboot); without one the machine makes and owns its own."""

    def __init__(self, cfg: MachineConfig, serial: dict[str, Backend],
                 boot_log: BootLog | None = None, debug_out=None,
                 host: HostContext | None = None) -> None:
        self.cfg = cfg
        self.boot_log = boot_log or BootLog()
        self._timer_stop = threading.Event()
        self._own_host = host is None
        self.host = host or HostContext()
        self.host.start()
        self.created: list[Path] = []   # images the device factories made for this boot
        # kvm-pvm (a software-assisted KVM: the probe finds SYSCALL broken) needs the syscall
        # fix-up; there guest RAM also stays on small pages: with transparent huge pages one
        # end-to-end boot saw guest user space compute garbage (not proven to be the cause).
        kvm_pvm = syscall_fixup_needed()
        self.vm = Vm(cfg.memory, cfg.cpus, cpu_profile=cfg.cpu.profile,
                     cpu_features=cfg.cpu.features,
                     exit_on_unhandled_io=cfg.on_unhandled_io == "exit",
                     syscall_fixup=kvm_pvm,
                     huge_pages=not kvm_pvm if cfg.huge_pages is None else cfg.huge_pages)
        try:
            self._build(serial, debug_out)
        except BaseException:
            self.close()
            remove_created(self.created)   # nothing half-made stays behind
            raise

    def _build(self, serial: dict[str, Backend], debug_out) -> None:
        vm = self.vm
        cfg = self.cfg
        pio = vm.pio
        self.uarts: dict[str, Uart16550] = {}
        ports = []
        self.uart_irqs = {}
        for name, backend in serial.items():
            if name == "debugcon":
                backend.attach(_DISCARD_INPUT)
                debug_out = backend.write
                continue
            label, port, irq = COM_PORTS[name]
            line = vm.irq_line(irq)
            self.uart_irqs[name] = line
            uart = Uart16550(line, backend.write)
            pio.insert(uart, port, 8)
            backend.attach(uart)
            self.uarts[name] = uart
            ports.append((label, port, irq))
        self.rtc = CmosRtc(vm.irq_line(layout.RTC_IRQ), utc=cfg.rtc == "utc",
                           memory_bytes=cfg.memory)
        pio.insert(self.rtc, layout.RTC_PORT, 2)
        self.i8042 = I8042(vm.irq_line(layout.I8042_KBD_IRQ), vm.irq_line(layout.I8042_AUX_IRQ),
                           on_reset=self._guest_reset)
        self.ps2_input = Ps2InputSink(self.i8042)
        self.host.input.attach(self.ps2_input)
        pio.insert(self.i8042, layout.I8042_DATA_PORT, 5)
        self.pm = AcpiPm(vm.irq_line(layout.SCI_IRQ, level_triggered=True),
                         on_power_off=self._guest_power_off)
        pio.insert(self.pm.event_block, layout.PM1A_EVT_PORT, layout.PM1A_EVT_LEN)
        pio.insert(self.pm.control_block, layout.PM1A_CNT_PORT, layout.PM1A_CNT_LEN)
        pio.insert(self.pm.timer, layout.PM_TMR_PORT, layout.PM_TMR_LEN)
        reset = ResetControl(self._guest_reset)
        pio.insert(DebugExit(self._debug_exit), layout.DEBUG_EXIT_PORT, 1)
        pio.insert(BootMarker(self.boot_log.mark), layout.BOOT_MARKER_PORT, 1)
        pio.insert(DebugCon(debug_out or (lambda data: None)), layout.DEBUGCON_PORT, 1)

        # PCI: the root bus, its two config mechanisms, then every device of the file.
        self.pci = PciRoot(vm, self.host.loop)
        self.pci.next_mem64 = self.pci.next_mem64_base = _align_up(
            layout.HIGH_RAM_START + max(0, cfg.memory - layout.LOW_RAM_END), layout.GiB)
        pio.insert(ConfigMechanism1(self.pci, reset), layout.PCI_CONFIG_ADDRESS, 8)
        vm.mmio.insert(Ecam(self.pci), layout.ECAM_BASE, layout.ECAM_SIZE)
        extra = [seed_device(cfg)] if cfg.cloud_init is not None else []
        self.placed = place_devices(cfg, extra)
        self.devices = []
        for placed in self.placed:
            ctx = DeviceContext(placed.id, cfg.name, str(cfg.uuid), self.host,
                                cfg.path.parent, placed.slot or 0, placed.func,
                                created=self.created)
            dev = placed.type.factory(ctx, placed.options)
            self.pci.add(dev, placed.slot or 0, placed.func)
            self.devices.append(dev)
        self.pci.assign_bars()

        mem = vm.memory
        assert mem is not None
        dsdt_extra = [pci_root_aml(self.pci), ecam_reservation_aml()]
        for frags in get_registry().pm.hook.vmrun_dsdt(devices=self.placed):
            dsdt_extra.extend(frags or [])
        tables = build_acpi(AcpiPlatform(ncpus=cfg.cpus, serial_ports=ports,
                                         dsdt_extra=dsdt_extra,
                                         ecam=ecam_allocation()))
        mem.write(layout.ACPI_BASE, tables.blob)
        mem.write(layout.SMBIOS_BASE, build_smbios(cfg.uuid, cfg.cpus, cfg.memory))
        entry = load_kernel(mem, cfg.boot.kernel, cfg.boot.initrd, cfg.boot.cmdline,
                            tables.rsdp_addr)
        vm.vcpus[0].set_entry_state(entry)

    # -- guest-initiated endings ------------------------------------------------------
    def _guest_reset(self) -> None:
        self.vm.request_exit(ExitCode.RESET, "guest reset")

    def _guest_power_off(self) -> None:
        self.vm.request_exit(ExitCode.POWER_OFF, "guest powered off (ACPI S5)")

    def _debug_exit(self, value: int) -> None:
        self.vm.request_exit(ExitCode(value) if value in ExitCode._value2member_map_ else
                             ExitCode.ERROR, f"guest wrote {value:#x} to the debug-exit port")

    # -- control from the host ---------------------------------------------------------
    def press_power_button(self) -> None:
        self.pm.press_power_button()

    def start(self) -> None:
        self.vm.start()
        self._rtc_timer = self.host.loop.timer(self._rtc_tick)
        self._rtc_timer.arm(0.0)

    def _rtc_tick(self) -> None:
        """Drive the RTC's time-based interrupts (update-ended, alarm, periodic) from a timer
        on the devices' event loop, re-armed for the next deadline (at most 0.5 s away, so a
        guest enabling an interrupt is noticed soon)."""
        if self._timer_stop.is_set():
            return
        rtc = self.rtc
        rtc.tick(time.time())
        deadline = rtc.next_deadline()
        now = time.time()
        delay = 0.5 if deadline is None else max(0.0, min(deadline - now, 0.5))
        self._rtc_timer.arm(delay)

    def wait(self, timeout: float | None = None) -> ExitInfo | None:
        return self.vm.wait(timeout)

    def stats(self) -> list[str]:
        """One line per device worth reporting (logged with -v when the VM ends)."""
        lines = [f"{name}: {line.raised} interrupts" for name, line in self.uart_irqs.items()]
        for placed, dev in zip(self.placed, self.devices, strict=False):
            inner = getattr(dev, "device", None)
            if inner is not None and hasattr(inner, "bytes_served"):
                lines.append(f"{placed.type.name}: served {inner.bytes_served} bytes")
            if inner is not None and hasattr(inner, "requests"):
                lines.append(f"{placed.type.name} {placed.id}: {inner.requests} requests")
        for vcpu in self.vm.vcpus:
            if vcpu.fixup is not None:
                r = vcpu.fixup.repaired
                lines.append(f"vcpu{vcpu.index}: repaired {r['syscall']} syscalls, "
                             f"{r['int80']} int 0x80")
        for name, count in self.vm.stats.emulated.items():
            lines.append(f"emulated {name}: {count}")
        return lines

    def stop(self, code: ExitCode, reason: str) -> None:
        self.vm.request_exit(code, reason)

    # -- snapshots (vmrun.snapshot; the vCPUs are paused) --------------------------------
    def save_state(self) -> dict:
        """Every device's state (vmrun.core.devstate contract) and the KVM state; guest RAM
        is the snapshot module's. A device that cannot save raises SnapshotUnsupported."""
        from vmrun.core.kvmstate import KvmState

        kvm_state = KvmState()
        return {"uarts": {name: u.save_state() for name, u in self.uarts.items()},
                "rtc": self.rtc.save_state(), "pm": self.pm.save_state(),
                "i8042": self.i8042.save_state(), "pci": self.pci.save_state(),
                "irq_lines": self.vm.irq_lines.save_state(), "kvm": kvm_state.save(self.vm)}

    def load_state(self, state: dict) -> list[str]:
        """Put a saved state into this freshly built (not started) machine; returns what
        this host's KVM refused."""
        from vmrun.core.kvmstate import KvmState

        if set(state["uarts"]) != set(self.uarts):
            raise ValueError(f"serial ports {sorted(state['uarts'])} saved, the machine has "
                             f"{sorted(self.uarts)}")
        kvm_state = KvmState()
        # The devices' interrupt lines take their saved levels once the irqchip is back.
        with self.vm.irq_lines.restoring(state["irq_lines"]):
            for name, uart in self.uarts.items():
                uart.load_state(state["uarts"][name])
            self.rtc.load_state(state["rtc"])
            self.pm.load_state(state["pm"])
            self.i8042.load_state(state["i8042"])
            self.pci.load_state(state["pci"])
            kvm_state.restore(self.vm, state["kvm"])
        return kvm_state.refused + [f"MSR {m:#x}" for m in kvm_state.skipped_msrs]

    def close(self) -> None:
        self._timer_stop.set()
        timer = getattr(self, "_rtc_timer", None)
        if timer is not None:
            timer.close()
        if hasattr(self, "ps2_input"):
            self.host.input.detach(self.ps2_input)
        if hasattr(self, "pci"):
            self.pci.close()
        if hasattr(self, "vm"):
            self.vm.close()
        if self._own_host:
            self.host.close()


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
