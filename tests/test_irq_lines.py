"""The board's interrupt wiring (:class:`vmrun.core.irq.IrqLines`): lines sharing a GSI are
ORed before KVM sees them, and a snapshot's line levels come back so that KVM's view and the
devices' agree after a restore; plus the guest's kvmclock standing still while the VM is
paused (QMP ``stop``), as QEMU's does."""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmrun.core.irq import IrqLines

KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


def board() -> tuple[IrqLines, list[tuple[int, int]]]:
    driven: list[tuple[int, int]] = []
    return IrqLines(lambda gsi, level: driven.append((gsi, level))), driven


def test_lines_sharing_a_gsi_are_wired_or() -> None:
    """Two INTx pins on GSI 16: one device lowering its pin must not drop the other's
    interrupt (each line driving KVM itself did)."""
    lines, driven = board()
    a, b = lines.line(16, level_triggered=True), lines.line(16, level_triggered=True)
    a.set_level(True)
    b.set_level(True)
    a.set_level(False)
    assert driven == [(16, 1)]              # still high: b holds it
    b.set_level(False)
    assert driven == [(16, 1), (16, 0)]
    a.set_level(False)                      # already low: nothing
    assert driven == [(16, 1), (16, 0)] and a.raised == 1 and b.raised == 1


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=60))
def test_kvm_sees_the_or_of_the_lines_of_each_gsi(steps) -> None:
    lines, driven = board()
    pins = [lines.line(16 + i % 2) for i in range(4)]       # two lines on each GSI
    for i, level in steps:
        pins[i].set_level(level)
    kvm = {16: 0, 17: 0}
    for gsi, level in driven:
        assert kvm[gsi] != level                            # only changes are driven
        kvm[gsi] = level
    for gsi in (16, 17):
        assert kvm[gsi] == int(any(p.level for p in pins if p.gsi == gsi))


def test_lines_set_from_several_threads_keep_the_count() -> None:
    lines, driven = board()
    pin = lines.line(4)

    def flap() -> None:
        for _ in range(2000):
            pin.set_level(True)
            pin.set_level(False)

    threads = [threading.Thread(target=flap) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not pin.level and driven[-1] == (4, 0)
    pin.set_level(True)
    assert driven[-1] == (4, 1)             # not stuck: the count came back to zero


def test_a_restore_puts_levels_back_and_drives_only_level_triggered_gsis() -> None:
    lines, driven = board()
    uart = lines.line(4)                        # ISA, edge-triggered
    intx = lines.line(16, level_triggered=True)
    other = lines.line(16, level_triggered=True)
    sci = lines.line(9, level_triggered=True)
    with lines.restoring([[4, 1], [16, 1], [16, 0], [9, 0]]):
        uart.set_level(True)                    # a device loading its state: not driven
        sci.set_level(True)
        assert driven == []
    # The saved levels win; GSI 16 (level, high) is driven again; the UART's edge was
    # delivered before the snapshot and is not repeated.
    assert driven == [(16, 1)]
    assert (uart.level, intx.level, other.level, sci.level) == (True, True, False, False)
    intx.set_level(False)                       # the device lowers it: KVM hears it
    uart.set_level(False)
    assert driven == [(16, 1), (16, 0), (4, 0)]
    uart.set_level(True)
    assert driven[-1] == (4, 1)


@pytest.mark.parametrize("saved, why", [
    ([[4, 1]], "GSIs [4] saved, the machine has [4, 16]"),
    ([[16, 1], [4, 0]], "GSIs [16, 4] saved"),
    ([[4, 2], [16, 0]], "saved as something other than"),
    ({"4": 1}, "saved as something other than"),
    ([[4, True], [16, 0]], "saved as something other than"),
])
def test_saved_lines_of_another_machine_are_refused(saved, why) -> None:
    lines, driven = board()
    lines.line(4)
    lines.line(16, level_triggered=True)
    with pytest.raises(ValueError, match=r"interrupt lines"), lines.restoring(saved):
        pass
    with pytest.raises(ValueError) as e, lines.restoring(saved):
        pass
    assert why in str(e.value) and driven == []


@pytest.mark.skipif(not KVM, reason="no /dev/kvm")
def test_kvmclock_stands_still_while_the_vm_is_paused() -> None:
    from vmrun.core.kvmstate import get_clock
    from vmrun.core.vm import Vm

    vm = Vm(4 << 20, 1)
    try:
        assert vm.pause()
        paused = get_clock(vm.fd)
        time.sleep(0.5)
        vm.resume()
        after = get_clock(vm.fd)
        # Without the clock held it would have run on by the 0.5 s of the pause.
        assert 0 <= after - paused < 200_000_000, (after - paused)
        time.sleep(0.2)
        assert get_clock(vm.fd) - after >= 150_000_000       # and it runs again
    finally:
        vm.close()
