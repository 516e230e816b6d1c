"""Guest DMA: scatter-gather views of guest memory, and a reader and a writer over them.

A device never touches a guest address it was handed without going through here. An
:class:`SgList` is a list of (guest address, length) pieces, every piece checked against guest
RAM when the list is made (zero-length pieces are dropped, whatever their address), so
nothing done with it later can fault: :class:`SgReader` reads exact byte counts and structs,
:class:`SgWriter` writes, both skip, and both hand out zero-copy ``memoryview`` slices for
``preadv``/``pwritev`` or host addresses for native AIO. Every violation is one
:class:`~vmrun.core.memory.GuestError`.

:class:`GuestDma` is a PCI function's window on guest memory: with bus mastering off in the
function's command register it refuses every transfer (:class:`DmaDisabled`), as a real
device's DMA engine would be unable to master the bus.

The buffer helpers the block backends share (zero fill, zero test, scatter/gather copies over
lists of memoryviews) live here too: they are DMA-side operations on guest buffers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence

from vmrun.core.memory import GuestError, GuestMemory, GuestMemoryError

__all__ = [
    "DmaDisabled", "GuestDma", "GuestError", "GuestMemoryError", "SgList", "SgReader",
    "SgWriter", "BufferCursor", "as_bytes_view", "buffers_len", "copy_in", "copy_out",
    "is_zero", "zero_fill",
]

CHUNK = 1 << 20
ZEROS = bytes(CHUNK)
Buffers = Sequence[memoryview]


class DmaDisabled(GuestError):
    """The guest turned bus mastering off: the device may not touch guest memory."""


class SgList:
    """Guest ranges, each checked to lie inside one RAM slot; views taken once."""

    __slots__ = ("pieces", "views", "hvas", "nbytes", "mem")

    def __init__(self, mem: GuestMemory, pieces: Iterable[tuple[int, int]]) -> None:
        self.mem = mem
        self.pieces: list[tuple[int, int]] = []
        self.views: list[memoryview] = []
        self.hvas: list[int] | None = []
        total = 0
        low = mem._low
        for gpa, length in pieces:
            if length <= 0:
                if length:
                    raise GuestError(f"negative length {length} at {gpa:#x}")
                continue
            # The slot check (GuestMemoryError outside RAM), the view and the host address
            # in one step: the low slot first, as GuestMemory does.
            s = low if low.gpa <= gpa and gpa + length <= low.end else mem._slot(gpa, length)
            off = gpa - s.gpa
            self.views.append(s.view[off:off + length])
            self.hvas.append(s.hva + off)
            self.pieces.append((gpa, length))
            total += length
        self.nbytes = total

    def __len__(self) -> int:
        return self.nbytes

    @classmethod
    def _checked(cls, mem: GuestMemory, pieces: list[tuple[int, int]],
                 views: list[memoryview]) -> SgList:
        """A sub-list of an already checked one (no second check)."""
        sg = cls.__new__(cls)
        sg.mem, sg.pieces, sg.views, sg.hvas = mem, pieces, views, None
        sg.nbytes = sum(n for _, n in pieces)
        return sg

    def iovecs(self, align: int = 1) -> list[tuple[int, int]] | None:
        """(host address, length) pairs, for I/O the kernel does into guest RAM (AIO); None
        when an address or a length is not a multiple of ``align`` (a power of two)."""
        mask = align - 1
        hvas = self.hvas
        if hvas is None:
            host = self.mem.host_address_of
            hvas = self.hvas = [host(g, n) for g, n in self.pieces]
        out = []
        for h, (_, n) in zip(hvas, self.pieces, strict=True):
            if (h | n) & mask:
                return None
            out.append((h, n))
        return out

    def reader(self) -> SgReader:
        return SgReader(self)

    def writer(self) -> SgWriter:
        return SgWriter(self)


class _Cursor:
    __slots__ = ("_sg", "_views", "_index", "_pos", "done", "total")

    def __init__(self, sg: SgList) -> None:
        self._sg = sg
        self._views = sg.views
        self._index = 0
        self._pos = 0
        self.done = 0
        self.total = sg.nbytes

    @property
    def remaining(self) -> int:
        return self.total - self.done

    def views(self, n: int | None = None) -> list[memoryview]:
        """The next ``n`` bytes (all that is left with None) as zero-copy slices."""
        if n is None:
            n = self.remaining
        if n < 0 or n > self.remaining:
            raise GuestError(f"buffer too short: {n} bytes wanted, {self.remaining} left")
        out: list[memoryview] = []
        views = self._views
        while n:
            v = views[self._index]
            piece = min(n, len(v) - self._pos)
            out.append(v[self._pos:self._pos + piece])
            self._pos += piece
            self.done += piece
            n -= piece
            if self._pos == len(v):
                self._index += 1
                self._pos = 0
        return out

    def skip(self, n: int) -> None:
        self.views(n)

    def take(self, n: int | None = None) -> SgList:
        """The next ``n`` bytes (all that is left with None) as an SgList of their own."""
        i, pos = self._index, self._pos
        views = self.views(n)
        pieces = []
        for v in views:
            gpa = self._sg.pieces[i][0] + pos
            pieces.append((gpa, len(v)))
            pos += len(v)
            if pos == self._sg.pieces[i][1]:
                i, pos = i + 1, 0
        return SgList._checked(self._sg.mem, pieces, views)


class SgReader(_Cursor):
    """Reads device-readable guest buffers in order."""

    __slots__ = ()

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (GuestError if fewer are left)."""
        parts = self.views(n)
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    def read_struct(self, st: struct.Struct) -> tuple:
        return st.unpack(self.read(st.size))


class SgWriter(_Cursor):
    """Writes device-writable guest buffers in order; ``done`` counts bytes written."""

    __slots__ = ()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """All of ``data`` (GuestError if the buffers are shorter)."""
        pos = 0
        for v in self.views(len(data)):
            v[:] = data[pos:pos + len(v)]
            pos += len(v)

    def write_struct(self, st: struct.Struct, *values: object) -> None:
        self.write(st.pack(*values))


class GuestDma:
    """A device's access to guest memory, gated by its bus-master enable."""

    __slots__ = ("mem", "_enabled", "_gate", "_byte", "_bit")

    def __init__(self, mem: GuestMemory, enabled: Callable[[], bool] | None = None, *,
                 gate: bytearray | None = None, byte: int = 0, bit: int = 0) -> None:
        """``gate[byte] & bit`` (a PCI function's command register: the core passes its
        config space) or ``enabled()`` says whether DMA is allowed; neither: always."""
        self.mem = mem
        self._enabled = enabled
        self._gate = gate
        self._byte = byte
        self._bit = bit

    @property
    def enabled(self) -> bool:
        g = self._gate
        if g is not None:
            return bool(g[self._byte] & self._bit)
        return self._enabled is None or bool(self._enabled())

    def check(self) -> None:
        g = self._gate
        if g is not None:
            if not g[self._byte] & self._bit:
                raise DmaDisabled("bus mastering is off")
        elif self._enabled is not None and not self._enabled():
            raise DmaDisabled("bus mastering is off")

    def sg(self, pieces: Iterable[tuple[int, int]]) -> SgList:
        self.check()
        return SgList(self.mem, pieces)

    def read(self, gpa: int, n: int) -> bytes:
        self.check()
        return self.mem.read(gpa, n)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.check()
        self.mem.write(gpa, data)

    def view(self, gpa: int, n: int) -> memoryview:
        self.check()
        return self.mem.view(gpa, n)


# -- helpers over lists of memoryviews (guest buffers), shared by the block backends ------
def as_bytes_view(buf: memoryview | bytes | bytearray) -> memoryview:
    """A flat unsigned-byte view, so lengths are byte counts whatever the source format."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def buffers_len(bufs: Buffers) -> int:
    return sum(b.nbytes for b in bufs)


class BufferCursor:
    """Walks a list of buffers, handing out the next N bytes as (zero-copy) slices."""

    def __init__(self, bufs: Buffers) -> None:
        self._bufs = [as_bytes_view(b) for b in bufs if b.nbytes]
        self._index = 0
        self._pos = 0

    def take(self, n: int) -> list[memoryview]:
        out: list[memoryview] = []
        while n > 0:
            if self._index >= len(self._bufs):
                raise ValueError("buffers are shorter than the request")
            buf = self._bufs[self._index]
            piece = min(n, len(buf) - self._pos)
            out.append(buf[self._pos:self._pos + piece])
            self._pos += piece
            n -= piece
            if self._pos == len(buf):
                self._index += 1
                self._pos = 0
        return out


def zero_fill(bufs: Buffers) -> None:
    """Clear guest buffers (unwritten sectors, reads past the end of a raw file)."""
    for b in bufs:
        for start in range(0, len(b), CHUNK):
            n = min(CHUNK, len(b) - start)
            b[start:start + n] = ZEROS[:n]


def is_zero(bufs: Buffers) -> bool:
    """True when every byte is zero; a memcmp against a zero block, no Python loop per byte."""
    for b in bufs:
        for start in range(0, len(b), CHUNK):
            if not ZEROS.startswith(b[start:start + CHUNK]):
                return False
    return True


def copy_out(src: memoryview | bytes | bytearray, bufs: Buffers) -> None:
    """Scatter ``src`` into ``bufs`` (bounce buffers and partial sectors only)."""
    pos = 0
    for b in bufs:
        b[:] = src[pos:pos + len(b)]
        pos += len(b)


def copy_in(bufs: Buffers, dst: memoryview | bytearray, at: int = 0) -> None:
    """Gather ``bufs`` into ``dst`` starting at ``at``."""
    for b in bufs:
        dst[at:at + len(b)] = b
        at += len(b)
