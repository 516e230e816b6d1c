"""Does this host's KVM keep a dirty page log? (probed once per process)

A device that maps host memory into the guest (a framebuffer in a RAM-backed BAR) finds what
the guest changed through KVM_GET_DIRTY_LOG on the slot, instead of comparing the whole
buffer. Not every KVM keeps the log: on kvm-pvm (this project's development host) a guest
that wrote three pages of a logged slot left an empty bitmap, although the writes landed
(``/work/shared/probes/dirty_log.c``). :func:`dirty_log_works` asks the same question with a
real-mode guest of three stores and a ``hlt``, once; a device falls back to comparing when
the answer is no.
"""

from __future__ import annotations

import logging
import mmap
import threading

from vmrun.core import kvm

log = logging.getLogger("vmrun.dirty_log")

PROBE_GPA = 0x20000
PROBE_SIZE = 0x10000
# mov ax,0x2000; mov ds,ax; mov byte [0x1000],1; mov byte [0x3000],1; mov byte [0x7000],1; hlt
PROBE_CODE = bytes([0xB8, 0x00, 0x20, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x10, 0x01,
                    0xC6, 0x06, 0x00, 0x30, 0x01, 0xC6, 0x06, 0x00, 0x70, 0x01, 0xF4])
PROBE_BITMAP = 0x8A                     # pages 1, 3 and 7 of the slot

_result: bool | None = None
_lock = threading.Lock()


def dirty_log_works() -> bool:
    """True when KVM_GET_DIRTY_LOG reports the pages a guest wrote (cached)."""
    global _result
    with _lock:
        if _result is None:
            try:
                _result = _probe()
            except OSError as e:
                log.debug("dirty-log probe failed: %s", e)
                _result = False
            log.debug("KVM dirty page log %s", "works" if _result else "does not work here")
        return _result


def _probe() -> bool:
    from vmrun.core.vm import Vm

    vm = Vm(PROBE_SIZE, 1, irqchip=False, huge_pages=False)
    fb = mmap.mmap(-1, PROBE_SIZE)
    try:
        assert vm.memory is not None
        vm.memory.write(0x1000, PROBE_CODE)
        slot = vm.add_memslot(PROBE_GPA, PROBE_SIZE,
                              int(kvm.ffi.cast("uintptr_t", kvm.ffi.from_buffer(fb))),
                              log_dirty=True)
        vm.get_dirty_log(slot, PROBE_SIZE)                 # start from a clean log
        v = vm.vcpus[0]
        s = v.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        v.set_sregs(s)
        r = kvm.ffi.new("struct kvm_regs *")
        r.rip, r.rflags = 0x1000, 2
        v.set_regs(r)
        kvm.ioctl(v.fd, kvm.KVM_RUN, 0)
        landed = fb[0x1000] == 1 and fb[0x7000] == 1
        bitmap = vm.get_dirty_log(slot, PROBE_SIZE)
        vm.remove_memslot(slot)
        return landed and bitmap[0] == PROBE_BITMAP
    finally:
        vm.close()
        fb.close()
