"""Split virtqueues (virtio 1.x, section 2.7): descriptor chains from an untrusted driver.

Everything read from the rings is checked before use: the available index may run at most
``num`` entries ahead, a head and every ``next`` must be inside the table, a chain may not be
longer than the queue (so a loop ends as an error), an indirect table is a whole number of
descriptors, never nested, never combined with NEXT, and every buffer must lie inside guest
RAM; device-readable buffers must come before device-writable ones. Zero-length descriptors
carry nothing and are dropped, whatever address they name (so no device ever sees an
address outside RAM). A violation raises :class:`VirtqueueError` (a
:class:`~vmrun.core.memory.GuestError`); the transport then marks the device
DEVICE_NEEDS_RESET. Work per chain is bounded by the queue size (or ``MAX_INDIRECT``).

The ring words the driver and device share while both run (the indices, flags, used
elements and event indices) are read and written through typed memoryviews: one load or
store each. ``struct.pack_into`` is not safe there: it zero-fills its target before writing
the value, so a driver polling the used index could see it drop to 0 for a moment (a native
test guest did, and a real driver would take that as thousands of completions).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from vmrun.core.memory import GuestError, GuestMemory, GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
MAX_INDIRECT = 1024   # descriptors in one indirect table (Linux uses at most the queue size)

_desc = struct.Struct("<QIHH")


class VirtqueueError(GuestError):
    """The driver put something invalid in the queue (one line, says what)."""


@dataclass(slots=True)
class DescriptorChain:
    """One request: its head index and its buffers, split by direction, with their total
    lengths (counted during the walk)."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)   # (gpa, len)
    writable: list[tuple[int, int]] = field(default_factory=list)
    epoch: int = 0        # the transport's reset count when it was popped
    readable_len: int = 0
    writable_len: int = 0


class Virtqueue:
    """One split virtqueue. The transport fills in the addresses; devices pop and push."""

    def __init__(self, index: int, max_size: int) -> None:
        self.index = index
        self.max_size = max_size
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.msix_vector = 0xFFFF
        self.event_idx = False
        self.last_avail = 0
        self.next_used = 0
        self.signalled_used: int | None = None
        self.epoch = 0
        self.mem: GuestMemory | None = None
        self._desc_view: memoryview | None = None
        self._avail: memoryview | None = None        # u16: flags, idx, ring[n], used_event
        self._used_hdr: memoryview | None = None     # u16: flags, idx
        self._used_elems: memoryview | None = None   # u32: id, len, id, len, ...
        self._avail_event: memoryview | None = None  # u16: the used ring's avail_event

    # -- set-up ------------------------------------------------------------------------
    def activate(self, mem: GuestMemory, event_idx: bool, epoch: int = 0) -> None:
        """Check the ring addresses the driver gave and take views of the rings."""
        n = self.size
        if n == 0 or n > self.max_size or n & (n - 1):
            raise VirtqueueError(f"queue {self.index}: size {n} is not a power of two "
                                 f"<= {self.max_size}")
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise VirtqueueError(f"queue {self.index}: misaligned ring address")
        try:
            self._desc_view = mem.view(self.desc_addr, DESC_SIZE * n)
            avail = mem.view(self.avail_addr, 6 + 2 * n)
            used = mem.view(self.used_addr, 6 + 8 * n)
            self._avail = avail.cast("H")
            self._used_hdr = used[:4].cast("H")
            self._used_elems = used[4:4 + 8 * n].cast("I")
            self._avail_event = used[4 + 8 * n:].cast("H")
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: ring outside guest RAM ({e})") from None
        self.mem = mem
        self.epoch = epoch
        self.event_idx = event_idx
        self.last_avail = 0
        self.next_used = 0

    # -- driver -> device ------------------------------------------------------------------
    def avail_idx(self) -> int:
        assert self._avail is not None
        return self._avail[1]

    def has_available(self) -> bool:
        return self.avail_idx() != self.last_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated; None when the ring is empty."""
        avail = self._avail
        assert avail is not None
        idx = avail[1]
        pending = (idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"queue {self.index}: available index {idx} is {pending} "
                                 f"entries ahead (queue size {self.size})")
        head = avail[2 + self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            # avail_event in the used ring: tell the driver where we are.
            self._avail_event[0] = self.last_avail  # type: ignore[index]
        return self._walk(head)

    def _walk(self, head: int) -> DescriptorChain:
        n = self.size
        if head >= n:
            raise VirtqueueError(f"queue {self.index}: head {head} is outside the table of {n}")
        mem = self.mem
        assert mem is not None
        # The common chain of a NIC or an RNG: one direct descriptor (same checks, no loop).
        addr, length, flags, _ = _desc.unpack_from(self._desc_view, DESC_SIZE * head)  # type: ignore[arg-type]
        if length and not flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
            low_start, low_end = mem.low_range
            if not (low_start <= addr and addr + length <= low_end) and \
                    not mem.contains(addr, length):
                raise VirtqueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x} is "
                                     f"outside guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                return DescriptorChain(head, [], [(addr, length)], self.epoch, 0, length)
            return DescriptorChain(head, [(addr, length)], [], self.epoch, length, 0)
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        low_start, low_end = mem.low_range
        table: memoryview = self._desc_view  # type: ignore[assignment]
        table_len = n
        i = head
        seen = 0
        indirect = False
        while True:
            addr, length, flags, nxt = _desc.unpack_from(table, DESC_SIZE * i)
            seen += 1
            if seen > table_len:
                raise VirtqueueError(f"queue {self.index}: chain at head {head} is longer than "
                                     f"its table ({table_len}): a loop?")
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise VirtqueueError(f"queue {self.index}: nested indirect table in chain "
                                         f"at head {head}")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT "
                                         f"at head {head}")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"queue {self.index}: indirect table of {length} bytes "
                                         f"at head {head}")
                try:
                    table = mem.view(addr, length)
                except GuestMemoryError:
                    raise VirtqueueError(f"queue {self.index}: indirect table {addr:#x}+"
                                         f"{length:#x} outside guest RAM") from None
                indirect = True
                table_len = length // DESC_SIZE
                i = 0
                seen = 0
                continue
            if length:
                if not (low_start <= addr and addr + length <= low_end) and \
                        not mem.contains(addr, length):
                    raise VirtqueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x} is "
                                         f"outside guest RAM")
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append((addr, length))
                    wlen += length
                elif writable:
                    raise VirtqueueError(f"queue {self.index}: device-readable buffer after a "
                                         f"writable one in chain at head {head}")
                else:
                    readable.append((addr, length))
                    rlen += length
            elif not flags & VIRTQ_DESC_F_WRITE and writable:
                raise VirtqueueError(f"queue {self.index}: device-readable buffer after a "
                                     f"writable one in chain at head {head}")
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable, self.epoch, rlen, wlen)
            if nxt >= table_len:
                raise VirtqueueError(f"queue {self.index}: next {nxt} is outside the table of "
                                     f"{table_len}")
            i = nxt

    def chain_at(self, head: int) -> DescriptorChain:
        """The chain at ``head`` walked again from the descriptor table: one a device had
        popped (and held) when a snapshot was taken, taken back after the restore."""
        return self._walk(head)

    def undo_pop(self) -> None:
        """Give the last popped chain back (the device could not take it now)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    # -- device -> driver ------------------------------------------------------------------
    def push_used(self, head: int, written: int) -> None:
        """Return a chain to the driver; ``written`` = bytes the device wrote into it."""
        elems = self._used_elems
        assert elems is not None and self._used_hdr is not None
        slot = self.next_used % self.size
        elems[2 * slot] = head
        elems[2 * slot + 1] = written
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._used_hdr[1] = self.next_used      # publish: one 16-bit store, after the element

    def needs_interrupt(self) -> bool:
        """After push_used: should the driver be interrupted (EVENT_IDX or NO_INTERRUPT)?"""
        avail = self._avail
        assert avail is not None
        new = self.next_used
        if not self.event_idx:
            return not avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        old = self.signalled_used
        self.signalled_used = new
        if old is None:
            return True
        used_event = avail[2 + self.size]
        # vring_need_event(): did new pass used_event since old?
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
