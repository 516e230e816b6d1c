"""Split virtqueue parsing against malformed chains (a corpus, then hypothesis-generated ones).

No exception other than VirtqueueError may escape, and through the transport any violation
leaves the device in DEVICE_NEEDS_RESET without touching memory outside guest RAM.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrun.core.memory import GuestMemory
from vmrun.core.virtio.device import STATUS_DEVICE_NEEDS_RESET
from vmrun.core.virtio.pci import VirtioPciTransport
from vmrun.core.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)
from vmrun.devices.virtio_rnd import VirtioRng
from vmrun.testing import FakeVm, VirtioDriver

MEM = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
N = 8


def make_queue(mem: GuestMemory, event_idx: bool = False) -> Virtqueue:
    q = Virtqueue(0, N)
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.activate(mem, event_idx)
    return q


def desc(mem: GuestMemory, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
         table: int = DESC) -> None:
    mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def publish(mem: GuestMemory, heads: list[int], idx: int | None = None) -> None:
    for k, h in enumerate(heads):
        mem.write_u16(AVAIL + 4 + 2 * k, h)
    mem.write_u16(AVAIL + 2, len(heads) if idx is None else idx)


@pytest.fixture
def mem():
    m = GuestMemory([(0, MEM)])
    yield m
    m.close()


def test_well_formed_chain(mem: GuestMemory) -> None:
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1)
    desc(mem, 1, 0x9000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
    desc(mem, 2, 0xA000, 1, VIRTQ_DESC_F_WRITE)
    publish(mem, [0])
    chain = q.pop()
    assert chain is not None
    assert chain.readable == [(0x8000, 16)]
    assert chain.writable == [(0x9000, 512), (0xA000, 1)]
    assert q.pop() is None
    q.push_used(chain.head, 513)
    assert mem.read_u16(USED + 2) == 1
    assert struct.unpack("<II", mem.read(USED + 4, 8)) == (0, 513)


def test_indirect_chain(mem: GuestMemory) -> None:
    q = make_queue(mem)
    table = 0x6000
    desc(mem, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1, table)
    desc(mem, 1, 0x9000, 8, VIRTQ_DESC_F_WRITE, 0, table)
    desc(mem, 3, table, 32, VIRTQ_DESC_F_INDIRECT)
    publish(mem, [3])
    chain = q.pop()
    assert chain.readable == [(0x8000, 16)] and chain.writable == [(0x9000, 8)]


MALFORMED = {
    "head outside table": lambda m: publish(m, [N]),
    "avail index too far ahead": lambda m: (desc(m, 0, 0x8000, 1), publish(m, [0], idx=N + 1)),
    "loop": lambda m: (desc(m, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1),
                       desc(m, 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0), publish(m, [0])),
    "self loop": lambda m: (desc(m, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0), publish(m, [0])),
    "next outside table": lambda m: (desc(m, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 200),
                                     publish(m, [0])),
    "buffer outside RAM": lambda m: (desc(m, 0, MEM - 8, 16), publish(m, [0])),
    "buffer address wraps": lambda m: (desc(m, 0, (1 << 64) - 8, 16), publish(m, [0])),
    "readable after writable": lambda m: (
        desc(m, 0, 0x8000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
        desc(m, 1, 0x8000, 1), publish(m, [0])),
    "nested indirect": lambda m: (desc(m, 0, 0x6000, 16, VIRTQ_DESC_F_INDIRECT, 0, 0x6000),
                                  desc(m, 0, 0x6000, 16, VIRTQ_DESC_F_INDIRECT),
                                  publish(m, [0])),
    "indirect with next": lambda m: (desc(m, 0, 0x6000, 16, VIRTQ_DESC_F_INDIRECT
                                          | VIRTQ_DESC_F_NEXT, 1), publish(m, [0])),
    "indirect odd length": lambda m: (desc(m, 0, 0x6000, 15, VIRTQ_DESC_F_INDIRECT),
                                      publish(m, [0])),
    "indirect empty": lambda m: (desc(m, 0, 0x6000, 0, VIRTQ_DESC_F_INDIRECT),
                                 publish(m, [0])),
    "indirect table outside RAM": lambda m: (desc(m, 0, MEM - 16, 32, VIRTQ_DESC_F_INDIRECT),
                                             publish(m, [0])),
    "indirect loop": lambda m: (desc(m, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1, 0x6000),
                                desc(m, 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0, 0x6000),
                                desc(m, 0, 0x6000, 32, VIRTQ_DESC_F_INDIRECT), publish(m, [0])),
    "indirect next outside": lambda m: (desc(m, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 5, 0x6000),
                                        desc(m, 0, 0x6000, 32, VIRTQ_DESC_F_INDIRECT),
                                        publish(m, [0])),
    "huge indirect table": lambda m: (desc(m, 0, 0x6000, 16 * 4096, VIRTQ_DESC_F_INDIRECT),
                                      publish(m, [0])),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_chain_is_rejected(mem: GuestMemory, name: str) -> None:
    q = make_queue(mem)
    MALFORMED[name](mem)
    with pytest.raises(VirtqueueError):
        q.pop()


@pytest.mark.parametrize("what", ["desc", "avail", "used"])
def test_rings_outside_ram_are_rejected(mem: GuestMemory, what: str) -> None:
    q = Virtqueue(0, N)
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    setattr(q, f"{what}_addr", MEM - 4)
    with pytest.raises(VirtqueueError):
        q.activate(mem, False)


def test_event_idx_suppresses_interrupts(mem: GuestMemory) -> None:
    q = make_queue(mem, event_idx=True)
    mem.write_u16(AVAIL + 4 + 2 * N, 1)   # used_event: interrupt once used idx passes 1
    q.push_used(0, 0)
    assert q.needs_interrupt()            # first completion always
    q.push_used(0, 0)                     # used idx 2 passes used_event 1
    assert q.needs_interrupt()
    q.push_used(0, 0)                     # 3: already signalled past 1
    assert not q.needs_interrupt()


descriptor = st.tuples(st.integers(0, MEM + 0x1000), st.integers(0, 0x3000),
                       st.integers(0, 7), st.integers(0, N + 2))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(descriptor, min_size=N, max_size=N),
       indirect=st.lists(descriptor, min_size=0, max_size=8),
       heads=st.lists(st.integers(0, N + 2), min_size=1, max_size=N + 2),
       avail_idx=st.integers(0, 0xFFFF))
def test_random_rings_never_escape(mem: GuestMemory, table, indirect, heads, avail_idx) -> None:
    mem.fill(0, 0x8000)
    for i, (a, n, f, nx) in enumerate(table):
        desc(mem, i, a if not f & VIRTQ_DESC_F_INDIRECT else 0x6000, n, f, nx)
    for i, (a, n, f, nx) in enumerate(indirect):
        desc(mem, i, a, n, f, nx, 0x6000)
    for k, h in enumerate(heads[:N]):
        mem.write_u16(AVAIL + 4 + 2 * k, h)
    mem.write_u16(AVAIL + 2, avail_idx)
    q = make_queue(mem)
    for _ in range(N + 1):
        try:
            chain = q.pop()
        except VirtqueueError:
            break
        if chain is None:
            break
        for a, n in chain.readable + chain.writable:
            assert 0 <= a and a + n <= MEM


def test_transport_marks_device_needs_reset(mem: GuestMemory) -> None:
    vm = FakeVm()
    try:
        t = VirtioPciTransport(VirtioRng())
        vm.pci.add(t, 3)
        vm.pci.assign_bars()
        drv = VirtioDriver(vm, 3)
        drv.setup()
        q = drv.queues[0]
        q.write_desc(0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0)     # a self loop
        q.publish(0)
        drv.kick(0)
        assert drv.status & STATUS_DEVICE_NEEDS_RESET
        assert vm.msi_count(t.msix.gsis[0]) == 1              # config-change interrupt
        q.add([], [8])
        drv.kick(0)
        assert q.get_used() == []                             # broken: serves nothing more
        drv.setup()                                           # reset + setup recovers it
        q = drv.queues[0]
        head, _ = q.add([], [8])
        drv.kick(0)
        assert q.get_used() == [(head, 8)]
    finally:
        vm.close()
