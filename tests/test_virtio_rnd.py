"""virtio-rnd through the modern PCI transport, driven by the mock driver."""

from __future__ import annotations

import pytest

from vmrun.core.virtio.pci import VirtioPciTransport
from vmrun.devices.virtio_rnd import VirtioRng
from vmrun.testing import FakeVm, VirtioDriver


@pytest.fixture
def vm():
    v = FakeVm()
    yield v
    v.close()


def place(vm: FakeVm, rate: int = 0, clock=None) -> tuple[VirtioPciTransport, VirtioDriver]:
    dev = VirtioRng(rate=rate, clock=clock) if clock else VirtioRng(rate=rate)
    t = VirtioPciTransport(dev)
    vm.pci.add(t, 5)
    vm.pci.assign_bars()
    return t, VirtioDriver(vm, 5)


def test_identity_and_capabilities(vm: FakeVm) -> None:
    t, drv = place(vm)
    assert drv.pci.read(5, 0, 0) == (0x1044 << 16) | 0x1AF4
    assert drv.pci.read(5, 0, 0x2C) == (4 << 16) | 0x1AF4    # subsystem: type 4
    assert set(drv.caps) == {1, 2, 3, 4}
    assert drv.notify_mult == 4
    assert drv.msix_cap


def test_fills_buffers_and_interrupts(vm: FakeVm) -> None:
    t, drv = place(vm)
    drv.setup()
    q = drv.queues[0]
    head, (buf,) = q.add([], [64])
    drv.kick(0)
    assert q.get_used() == [(head, 64)]
    data = vm.memory.read(buf, 64)
    assert data != b"\xee" * 64 and len(set(data)) > 8
    gsi = t.msix.gsis[1]
    assert vm.msi_count(gsi) == 1
    head2, (a, b) = q.add([], [16, 16], indirect=True)
    drv.kick(0)
    assert q.get_used() == [(head2, 32)]


def test_rate_limit_serves_only_the_budget(vm: FakeVm) -> None:
    now = [0.0]
    t, drv = place(vm, rate=100, clock=lambda: now[0])
    drv.setup()
    q = drv.queues[0]
    q.add([], [64])
    q.add([], [64])
    drv.kick(0)
    used = q.get_used()
    assert sum(n for _, n in used) == 100    # 64 + 36: the bucket holds one second's worth
    t.device.close()
