"""A hostile virtio driver: hypothesis-generated action sequences against any virtio device.

:class:`HostileDriver` drives one :class:`~vmrun.core.virtio.pci.VirtioPciTransport` placed
on a :class:`~vmrun.testing.FakeVm` the way a malicious guest would: legitimate driver steps
(set-up, well-formed requests, kicks, resets) mixed with hostile ones — random writes of
every size to the common and device configuration, the notify area, the MSI-X table (found
from the MSI-X capability) and PCI configuration space (bus mastering off and on, BARs moved);
status bits in any order, queue set-up changed while live, ring addresses outside RAM,
overlapping or misaligned; random descriptors (zero-length ones outside RAM, loops, huge
lengths, indirect tables of random sizes, nested ones), available-index jumps, used-event
values, scribbles over the rings. :func:`actions` is the hypothesis strategy of such
sequences; :meth:`HostileDriver.run` plays one and checks, after it:

(a) no exception escaped a bus access (the vCPU side), and every read answered an int;
(b) the event loop recorded no fault without a device owner, and it still serves (sync);
(c) every used element the device pushed names a head it popped (< queue size) and a length
    no larger than that chain's writable bytes;
(d) traced host memory (when ``tracemalloc`` is on) grew by less than ``max_memory`` at peak;
(e) no bus access, kick or reset took longer than ``max_access_s``;
(f) recovery: PCI config restored, a driver reset, :meth:`VirtioDriver.setup` and one
    well-formed request (the profile's ``good_request``) served correctly.

Device-specific parts come in a :class:`Profile`: how to build the device, a strategy of
request chains for it, and the good request. Use it from a test::

    @given(acts=actions(profile))
    def test_hostile(acts):
        with HostileDriver.create(profile) as h:
            h.run(acts)
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from vmrun.core.pci import BAR0, COMMAND, COMMAND_MASTER
from vmrun.core.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VirtioDevice,
)
from vmrun.core.virtio.pci import VirtioPciTransport
from vmrun.core.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT
from vmrun.testing.fakes import FakeVm
from vmrun.testing.virtio import Allocator, MockVirtqueue, VirtioDriver

MiB = 1 << 20
MEMORY = 4 * MiB                   # guest RAM of the FakeVm
SLOT = 6
RING_BASE, RING_END = 0x10000, 0x80000         # the hostile driver's rings (same every set-up)
INDIRECT_BASE, INDIRECT_SLOTS = 0x80000, 16    # indirect tables, 4 KiB apart
BUF_BASE, BUF_END = 0x100000, 0x300000         # request buffers (a wrapping allocator)
RECOVERY_BASE = 0x300000                       # VirtioDriver.setup's rings and buffers

STATUS_BITS = (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
               STATUS_DEVICE_NEEDS_RESET, STATUS_FAILED)
COMMON_REGS = (0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1A, 0x1C, 0x1E,
               0x20, 0x24, 0x28, 0x2C, 0x30, 0x34)
U64 = (1 << 64) - 1


class HostileFailure(AssertionError):
    """An invariant broke (the message says which, and during what access)."""


class WrappingAllocator(Allocator):
    """A bump allocator that starts over when it runs out (old buffers get reused)."""

    def alloc(self, size: int, align: int = 16) -> int:
        size = min(size, self.end - self.start - align)
        try:
            return super().alloc(size, align)
        except MemoryError:
            self.next = self.start
            return super().alloc(size, align)

    def __init__(self, start: int, end: int) -> None:
        super().__init__(start, end)
        self.start = start


@dataclass
class Profile:
    """What the hostile driver needs to know about one device."""

    name: str
    make: Callable[[], VirtioDevice]
    #: strategy of (readable buffers, writable lengths): requests shaped for this device
    request: st.SearchStrategy[tuple[list[bytes], list[int]]]
    #: the recovery check: serve one well-formed request through ``h.drv`` (raise on failure)
    good_request: Callable[[HostileDriver], None]
    setup_hook: Callable[[HostileDriver], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- strategies -------------------------------------------------------------------------------
sizes = st.sampled_from([1, 2, 4, 8])


def _outside(mem: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([mem, mem + 1, mem + 0x1000, 0xFEE00000, 1 << 32,
                                      (1 << 32) - 16, U64, U64 - 15, 1 << 63]),
                     st.integers(mem, U64))


def addresses(mem: int = MEMORY) -> st.SearchStrategy[Any]:
    """Guest addresses: inside RAM, at its edge, outside it, or one of the driver's own
    rings plus a small delta (("ring", which, delta), resolved when used: overlaps)."""
    return st.one_of(
        st.integers(0, mem - 1),
        st.integers(0, mem // 16 - 1).map(lambda x: 16 * x),
        st.integers(1, 64).map(lambda k: mem - k),
        _outside(mem),
        st.tuples(st.just("ring"), st.integers(0, 3), st.integers(-64, 64)),
    )


lengths = st.one_of(st.sampled_from([0, 0, 1, 15, 16, 17, 512, 4096, 65536, 1 << 31,
                                     (1 << 32) - 1]),
                    st.integers(0, (1 << 32) - 1), st.integers(0, 8192))
desc_flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))


def values(mem: int = MEMORY) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from([0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF,
                                      0x10000, 0xFFFFFFFF, 1 << 32, U64]),
                     st.integers(0, 0x3FF), st.integers(0, U64), addresses(mem))


status_values = st.one_of(
    st.sampled_from([0, 1, 3, 7, 11, 15, 4, 8, 12, 0x40, 0x80, 0xFF, 0x4F, 0x8F]),
    st.lists(st.sampled_from(STATUS_BITS), max_size=4).map(sum), st.integers(0, 0xFF))
descriptor = st.tuples(addresses(), lengths, desc_flags, st.integers(0, 300))


def actions(profile: Profile, max_size: int = 40) -> st.SearchStrategy[list[tuple]]:
    """Sequences of legitimate and hostile driver steps for ``profile``'s device."""
    q = st.one_of(st.just(0), st.integers(0, 3), st.sampled_from([0x7FFF, 0xFFFF]))
    offset = st.one_of(st.sampled_from(COMMON_REGS), st.integers(0, 0x3F), st.integers(0, 0xFFF))
    pci_offset = st.one_of(st.sampled_from([COMMAND, COMMAND + 1, 0x06, 0x3C, BAR0, BAR0 + 8,
                                            "msix", "msix+2", "msix+3"]), st.integers(0, 0xFF))
    one = st.one_of(
        st.tuples(st.just("common_write"), offset, sizes, values()),
        st.tuples(st.just("common_read"), offset, sizes),
        st.tuples(st.just("status"), status_values),
        st.tuples(st.just("queue"), q, st.sampled_from(["size", "vector", "enable", "desc",
                                                        "avail", "used"]), values()),
        st.tuples(st.just("devcfg_write"), st.integers(0, 0xFFF), sizes, values()),
        st.tuples(st.just("devcfg_read"), st.integers(0, 0x7F), sizes),
        st.tuples(st.just("isr_read")),
        st.tuples(st.just("notify_write"), st.one_of(st.sampled_from([0, 4, 8]),
                                                     st.integers(0, 0xFFF)), sizes, values()),
        st.tuples(st.just("msix_write"), st.integers(0, 0x1010), sizes, values()),
        st.tuples(st.just("msix_read"), st.integers(0, 0x1010), sizes),
        st.tuples(st.just("pci_write"), pci_offset, st.sampled_from([1, 2, 4]), values()),
        st.tuples(st.just("pci_read"), st.integers(0, 0xFF), st.sampled_from([1, 2, 4])),
        st.tuples(st.just("bus_master"), st.booleans()),
        st.tuples(st.just("desc"), st.integers(0, 300), addresses(), lengths, desc_flags,
                  st.integers(0, 300)),
        st.tuples(st.just("indirect"), st.integers(0, 300), st.integers(0, INDIRECT_SLOTS - 1),
                  st.lists(descriptor, min_size=0, max_size=8),
                  st.one_of(st.none(), lengths), st.booleans(), st.booleans()),
        st.tuples(st.just("chain"), profile.request, st.booleans(),
                  st.sampled_from([16, 512, 4096])),
        st.tuples(st.just("request"), profile.request, st.booleans(),
                  st.sampled_from([16, 512, 4096])),
        st.tuples(st.just("request"), profile.request, st.booleans(),
                  st.sampled_from([16, 512, 4096])),
        st.tuples(st.just("publish"), st.lists(st.one_of(st.integers(0, 7),
                                                         st.integers(0, 0xFFFF)), max_size=4)),
        st.tuples(st.just("avail_idx"), st.one_of(st.integers(0, 0xFFFF),
                                                  st.integers(-3, 300))),
        st.tuples(st.just("used_event"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("avail_flags"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("scribble"), st.integers(0, 2), st.integers(0, 8200),
                  st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("kick"), q),
        st.tuples(st.just("kick"), st.just(0)),
        st.tuples(st.just("reset")),
        st.tuples(st.just("setup"), st.sampled_from([None, 0, VIRTIO_F_RING_EVENT_IDX,
                                                     VIRTIO_F_RING_INDIRECT_DESC]),
                  st.booleans(), st.sampled_from([None, None, 1, 2, 4, 16, 3, 100, 512])),
        st.tuples(st.just("wait"), st.integers(0, 3)),
    )
    return st.lists(one, min_size=min(8, max_size), max_size=max_size)


# -- the driver --------------------------------------------------------------------------------
class _GuardedBus:
    """A bus as the vCPU sees it: every access timed, nothing may raise, reads answer ints."""

    def __init__(self, bus, guard: HostileDriver, kind: str) -> None:
        self.bus, self.guard, self.kind = bus, guard, kind

    def read(self, addr: int, size: int) -> int:
        v = self.guard.call(f"{self.kind} read {addr:#x}/{size}", self.bus.read, addr, size)
        if not isinstance(v, int):
            raise HostileFailure(f"{self.kind} read {addr:#x}/{size} answered {v!r}")
        return v & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1          # what a vCPU can put on the bus
        self.guard.call(f"{self.kind} write {addr:#x}/{size}={value:#x}", self.bus.write, addr,
                        size, value)


class _GuardedVm:
    def __init__(self, vm: FakeVm, guard: HostileDriver) -> None:
        self.vm = vm
        self.memory = vm.memory
        self.mmio = _GuardedBus(vm.mmio, guard, "mmio")
        self.pio = _GuardedBus(vm.pio, guard, "pio")
        self.guard = guard

    def sync(self) -> None:
        self.guard.sync()


class HostileDriver:
    """One hostile guest driver for the virtio function at ``slot`` of ``vm``."""

    def __init__(self, vm: FakeVm, transport: VirtioPciTransport, profile: Profile,
                 slot: int = SLOT, max_access_s: float = 10.0, max_memory: int = 64 * MiB) -> None:
        self.vm = vm
        self.transport = transport
        self.profile = profile
        self.slot = slot
        self.max_access_s = max_access_s
        self.max_memory = max_memory
        self.gvm = _GuardedVm(vm, self)
        self.drv = VirtioDriver(self.gvm, slot)
        self.pci = self.drv.pci
        self.mem = vm.memory
        self.buffers = WrappingAllocator(BUF_BASE, BUF_END)
        self.violations: list[str] = []
        self.steps = 0
        # What a guest knows after enumeration: BARs, command, the MSI-X table's place.
        self.saved_config = [self.pci.read(slot, 0, off) for off in range(BAR0, BAR0 + 24, 4)]
        self.saved_command = self.pci.read(slot, 0, COMMAND, 2)
        cap = self.drv.msix_cap
        self.msix_bar = self.pci.read(slot, 0, cap + 4) & 7 if cap else None
        self.msix_offset = self.pci.read(slot, 0, cap + 4) & ~7 if cap else 0
        self.outstanding: list[dict[int, list[int]]] = []
        for q in transport.queues:
            self._instrument(q)

    @classmethod
    def create(cls, profile: Profile, memory: int = MEMORY, **kw: Any) -> HostileDriver:
        vm = FakeVm(memory=memory)
        try:
            t = VirtioPciTransport(profile.make())
            vm.pci.add(t, SLOT)
            vm.pci.assign_bars()
            return cls(vm, t, profile, **kw)
        except BaseException:
            vm.close()
            raise

    def close(self) -> None:
        """Close the VM; a fault the teardown caused (a late completion, say) fails."""
        before = len(self.vm.loop.faults)
        self.vm.close()
        late = self.vm.loop.faults[before:]
        if late:
            raise HostileFailure(f"event-loop faults while the VM closed: {late}")

    def __enter__(self) -> HostileDriver:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.vm.close()

    # -- guards ------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.monotonic()
        try:
            result = fn(*args)
        except Exception as e:
            raise HostileFailure(f"step {self.steps}: {what} raised {type(e).__name__}: "
                                 f"{e}") from e
        dt = time.monotonic() - t0
        if dt > self.max_access_s:
            raise HostileFailure(f"step {self.steps}: {what} took {dt:.2f} s")
        return result

    def sync(self) -> None:
        t0 = time.monotonic()
        if not self.vm.loop.sync(max(5.0, 2 * self.max_access_s)):
            raise HostileFailure(f"step {self.steps}: the event loop is stuck (sync timed out)")
        dt = time.monotonic() - t0
        if dt > self.max_access_s:
            raise HostileFailure(f"step {self.steps}: the event loop took {dt:.2f} s to serve")

    def _instrument(self, q) -> None:
        """Check every used element the device pushes against the chains it popped."""
        popped: dict[int, list[int]] = {}
        self.outstanding.append(popped)
        pop, push, activate = q.pop, q.push_used, q.activate

        def checked_pop():
            chain = pop()
            if chain is not None:
                popped.setdefault(chain.head, []).append(chain.writable_len)
            return chain

        def checked_push(head: int, written: int) -> None:
            if not 0 <= head < q.size:
                self.violations.append(f"queue {q.index}: used head {head} >= size {q.size}")
            lens = popped.get(head)
            if not lens:
                self.violations.append(f"queue {q.index}: used head {head} was not popped")
            else:
                best = max(lens)
                lens.remove(best)
                if not 0 <= written <= best:
                    self.violations.append(f"queue {q.index}: used length {written} for head "
                                           f"{head} with {best} writable bytes")
            push(head, written)

        def checked_activate(*a: Any, **k: Any) -> None:
            popped.clear()
            activate(*a, **k)

        q.pop, q.push_used, q.activate = checked_pop, checked_push, checked_activate

    # -- addresses -----------------------------------------------------------------------
    def bar(self, index: int) -> int:
        return self.pci.bar_address(self.slot, 0, index)

    def region(self, cfg_type: int) -> int:
        bar, off, _ = self.drv.caps[cfg_type]
        return self.bar(bar) + off

    def _queue(self, i: int = 0) -> MockVirtqueue | None:
        qs = self.drv.queues
        return qs[i] if i < len(qs) else None

    def _resolve(self, v: Any) -> int:
        if isinstance(v, tuple):
            _, which, delta = v
            q = self._queue()
            base = RING_BASE if q is None else (q.desc, q.avail, q.used, BUF_BASE)[which]
            return (base + delta) & U64
        return v

    def _mem_write(self, gpa: int, data: bytes) -> None:
        if self.mem.contains(gpa, len(data)):
            self.mem.write(gpa, data)

    # -- running -------------------------------------------------------------------------
    def run(self, acts: list[tuple], trace_memory: bool = True) -> None:
        """Legitimate set-up, the actions, then every invariant and the recovery check.
        With ``trace_memory``, tracemalloc runs during the actions (started here unless it
        is already on: it slows every allocation, hypothesis's own included)."""
        started = trace_memory and not tracemalloc.is_tracing()
        if started:
            tracemalloc.start(1)
        try:
            if trace_memory:
                tracemalloc.reset_peak()
                start = tracemalloc.get_traced_memory()[0]
            self.setup()
            for self.steps, act in enumerate(acts, 1):
                getattr(self, "do_" + act[0])(*act[1:])
            self.steps = len(acts) + 1
            self.sync()
            if trace_memory:
                peak = tracemalloc.get_traced_memory()[1] - start
                if peak > self.max_memory:
                    raise HostileFailure(f"host memory grew by {peak / MiB:.1f} MiB at peak")
        finally:
            if started:
                tracemalloc.stop()
        self.recover()
        self.check()

    def check(self) -> None:
        faults = [(n, r) for n, r in self.vm.loop.faults if n != self.transport.name]
        if faults:
            raise HostileFailure(f"event-loop faults without a device owner: {faults}")
        if self.violations:
            raise HostileFailure("; ".join(self.violations[:5]))

    def setup(self, features: int | None = None, msix: bool = True,
              size: int | None = None) -> bool:
        """The legitimate set-up (reset, features, rings at fixed addresses, DRIVER_OK)."""
        self.drv.common_write(0x14, 1, 0)
        nq = self.drv.common_read(0x12, 2)
        if nq == 0 or nq > 8:
            return False             # BAR 0 moved away or switched off: nothing to set up
        self.drv.alloc = Allocator(RING_BASE, RING_END)
        try:
            self.drv.setup(features, None if size is None else [size] * nq, msix)
        except RuntimeError:          # features refused (status scrambled in between)
            return False
        for q in self.drv.queues:
            q.alloc = self.buffers
        return True

    def recover(self) -> None:
        """(f): restore PCI config, reset, VirtioDriver.setup(), one good request."""
        for i, v in enumerate(self.saved_config):
            self.pci.write(self.slot, 0, BAR0 + 4 * i, 4, v)
        self.pci.write(self.slot, 0, COMMAND, 2, self.saved_command)
        if self.drv.msix_cap:
            self.pci.write(self.slot, 0, self.drv.msix_cap + 2, 2, 0)
        t0 = time.monotonic()
        self.drv.common_write(0x14, 1, 0)
        if time.monotonic() - t0 > self.max_access_s:
            raise HostileFailure("the driver reset took too long")
        self.drv.alloc = Allocator(RECOVERY_BASE, self.mem.size)
        self.drv.setup()
        status = self.drv.status
        if status & STATUS_DEVICE_NEEDS_RESET or not status & STATUS_DRIVER_OK:
            raise HostileFailure(f"after reset and set-up the device status is {status:#x}")
        self.profile.good_request(self)

    def wait_used(self, q: MockVirtqueue, head: int, timeout: float = 3.0) -> int:
        """The used length of ``head`` once the device returns it (HostileFailure if not)."""
        end = time.monotonic() + timeout
        while True:
            for h, n in q.get_used():
                if h != head:
                    raise HostileFailure(f"used ring returned head {h}, expected {head}")
                return n
            if time.monotonic() > end:
                raise HostileFailure(f"the device did not serve a good request after reset "
                                     f"(status {self.drv.status:#x})")
            time.sleep(0.0005)

    # -- actions ---------------------------------------------------------------------------
    def do_common_write(self, off: int, size: int, value: Any) -> None:
        self.drv.common_write(off, size, self._resolve(value))

    def do_common_read(self, off: int, size: int) -> None:
        self.drv.common_read(off, size)

    def do_status(self, value: int) -> None:
        self.drv.common_write(0x14, 1, value)

    def do_queue(self, qsel: int, fld: str, value: Any) -> None:
        value = self._resolve(value)
        self.drv.common_write(0x16, 2, qsel)
        reg = {"size": 0x18, "vector": 0x1A, "enable": 0x1C}.get(fld)
        if reg is not None:
            self.drv.common_write(reg, 2, value & 0xFFFF if fld != "enable" else value & 1)
        else:
            base = {"desc": 0x20, "avail": 0x28, "used": 0x30}[fld]
            self.drv.common_write(base, 4, value & 0xFFFFFFFF)
            self.drv.common_write(base + 4, 4, value >> 32)

    def do_devcfg_write(self, off: int, size: int, value: Any) -> None:
        self.gvm.mmio.write(self.region(4) + off, size, self._resolve(value))

    def do_devcfg_read(self, off: int, size: int) -> None:
        self.gvm.mmio.read(self.region(4) + off, size)

    def do_isr_read(self) -> None:
        self.gvm.mmio.read(self.region(3), 1)

    def do_notify_write(self, off: int, size: int, value: Any) -> None:
        self.gvm.mmio.write(self.region(2) + off, size, self._resolve(value))
        self.sync()

    def do_msix_write(self, off: int, size: int, value: Any) -> None:
        if self.msix_bar is not None:
            self.gvm.mmio.write(self.bar(self.msix_bar) + self.msix_offset + off, size,
                                self._resolve(value))

    def do_msix_read(self, off: int, size: int) -> None:
        if self.msix_bar is not None:
            self.gvm.mmio.read(self.bar(self.msix_bar) + self.msix_offset + off, size)

    def do_pci_write(self, off: Any, size: int, value: Any) -> None:
        if isinstance(off, str):
            off = self.drv.msix_cap + int(off[5:] or 0)
        value = self._resolve(value)
        if off % 4 + size > 4:
            size = 4 - off % 4
        self.pci.write(self.slot, 0, off, size, value & ((1 << (8 * size)) - 1))

    def do_pci_read(self, off: int, size: int) -> None:
        if off % 4 + size > 4:
            size = 4 - off % 4
        self.pci.read(self.slot, 0, off, size)

    def do_bus_master(self, on: bool) -> None:
        cmd = self.pci.read(self.slot, 0, COMMAND, 2)
        cmd = cmd | COMMAND_MASTER if on else cmd & ~COMMAND_MASTER
        self.pci.write(self.slot, 0, COMMAND, 2, cmd)

    def _desc_table(self) -> tuple[int, int]:
        q = self._queue()
        return (RING_BASE, 256) if q is None else (q.desc, q.size)

    def do_desc(self, i: int, addr: Any, length: int, flags: int, nxt: int) -> None:
        table, n = self._desc_table()
        self._mem_write(table + 16 * (i % max(n, 1)),
                        struct.pack("<QIHH", self._resolve(addr), length, flags, nxt))

    def do_indirect(self, head: int, slot: int, entries: list, declared: int | None,
                    nested: bool, with_next: bool) -> None:
        base = INDIRECT_BASE + 0x1000 * slot
        for k, (addr, length, flags, nxt) in enumerate(entries):
            if nested and k == len(entries) - 1:
                addr, flags = base, flags | VIRTQ_DESC_F_INDIRECT
            self._mem_write(base + 16 * k, struct.pack("<QIHH", self._resolve(addr), length,
                                                       flags, nxt % max(len(entries), 1)))
        table, n = self._desc_table()
        length = 16 * len(entries) if declared is None else declared
        flags = VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_NEXT if with_next else 0)
        h = head % max(n, 1)
        self._mem_write(table + 16 * h, struct.pack("<QIHH", base, length, flags, 0))
        q = self._queue()
        if q is not None:
            q.publish(h)

    def do_chain(self, request: tuple[list[bytes], list[int]], indirect: bool,
                 align: int) -> None:
        q = self._queue()
        if q is None:
            return
        readable, writable = request
        q.add(readable, writable, indirect=indirect, align=align)

    def do_request(self, request: tuple[list[bytes], list[int]], indirect: bool,
                   align: int) -> None:
        """A request posted and kicked at once (what a well-behaved driver does)."""
        self.do_chain(request, indirect, align)
        self.do_kick(0)

    def do_publish(self, heads: list[int]) -> None:
        q = self._queue()
        if q is not None:
            for h in heads:
                q.publish(h)

    def do_avail_idx(self, value: int) -> None:
        q = self._queue()
        if q is not None:
            q.avail_idx = (q.avail_idx + value if value < 300 else value) & 0xFFFF
            self.mem.write_u16(q.avail + 2, q.avail_idx)

    def do_used_event(self, value: int) -> None:
        q = self._queue()
        if q is not None:
            self.mem.write_u16(q.avail + 4 + 2 * q.size, value)

    def do_avail_flags(self, value: int) -> None:
        q = self._queue()
        if q is not None:
            self.mem.write_u16(q.avail, value)

    def do_scribble(self, which: int, off: int, data: bytes) -> None:
        q = self._queue()
        if q is not None:
            self._mem_write((q.desc, q.avail, q.used)[which] + off, data)

    def do_kick(self, qi: int) -> None:
        t0 = time.monotonic()
        self.gvm.mmio.write(self.region(2) + qi * self.drv.notify_mult, 2, qi)
        self.sync()
        dt = time.monotonic() - t0
        if dt > self.max_access_s:
            raise HostileFailure(f"step {self.steps}: kick of queue {qi} took {dt:.2f} s")

    def do_reset(self) -> None:
        self.drv.common_write(0x14, 1, 0)

    def do_setup(self, features: int | None, msix: bool, size: int | None) -> None:
        self.setup(features, msix, size)

    def do_wait(self, ms: int) -> None:
        time.sleep(ms / 1000)
