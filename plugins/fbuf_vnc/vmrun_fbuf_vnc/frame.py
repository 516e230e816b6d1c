"""The frame a VNC server shows, and what changed in it since the last look.

:class:`FrameTracker` keeps a shadow copy of the visible frame (``height`` rows of
``width * 4`` bytes, in the guest's byte order) and, on :meth:`refresh`, finds the 64x64
tiles that changed:

- through KVM's dirty page log on the framebuffer's memory slot where the host keeps one (the
  log names the 4 KiB pages written; only their rows are compared), or
- by comparing every row with the shadow (one ``memcmp`` of each row: about 1 ms for 1024x768)
  where it does not — on kvm-pvm the log stays empty (``vmrun.core.dirty_log``), and the
  first refreshes of every mapping (and one a second after them) check the log against a
  full comparison, so a KVM whose log misses writes is caught even where the probe said it
  works: the tracker then compares from there on (one log line).

A vertical scroll of most of the frame (fbcon's) is recognised too: the update is then a
CopyRect of the part that moved plus the tiles that differ from the moved frame.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from vmrun_fbuf_vnc import fast
from vmrun_fbuf_vnc.display import BochsDisplay, Mode

log = logging.getLogger("vmrun.fbuf")

TILE = 64
PAGE = 4096
VERIFY_REFRESHES = 30          # refreshes with changes that check the dirty log's answer
AUDIT_EVERY = 30               # and then one refresh in this many (once a second at 30 Hz)


@dataclass
class Change:
    """What one refresh found. ``tiles``: tile numbers (``ty * tiles_x + tx``) whose pixels
    differ from before; ``scroll``: rows the frame moved up by, with ``residual``: the tiles
    that differ from the moved old frame (what to send after a CopyRect)."""

    resized: bool = False
    tiles: set[int] = field(default_factory=set)
    scroll: int = 0
    residual: set[int] = field(default_factory=set)


class FrameTracker:
    def __init__(self, width: int, height: int, *, dirty_log: bool = False) -> None:
        self.dev: BochsDisplay | None = None
        self.dirty_log_allowed = dirty_log
        self.dirty_log_trusted = dirty_log
        self.width, self.height = width, height
        self.big_endian = False
        self.shadow = bytearray(width * height * 4)
        self._spare = bytearray(width * height * 4)     # the C path's next shadow
        self.mode: Mode | None = None
        self.use_c = fast.lib is not None
        self._seen: tuple[int, int, Mode | None] | None = None   # generation, changes, mode
        self._verify = 0
        self.refreshes = 0
        self.rows_compared = 0

    @property
    def tiles_x(self) -> int:
        return (self.width + TILE - 1) // TILE

    @property
    def tiles_y(self) -> int:
        return (self.height + TILE - 1) // TILE

    def all_tiles(self) -> set[int]:
        return set(range(self.tiles_x * self.tiles_y))

    def attach(self, dev: BochsDisplay | None) -> None:
        """Show ``dev``'s frame from the next refresh (None: keep the last frame, blanked)."""
        self.dev = dev
        self._seen = None

    # -- refresh -------------------------------------------------------------------------
    def refresh(self, scrolls: bool = True) -> Change:
        """Look at the frame; ``scrolls``: also look for a scroll (only worth it when a
        client takes CopyRect)."""
        self.refreshes += 1
        dev = self.dev
        mode = dev.mode() if dev is not None else None
        ram = dev.ram_bars.get(0) if dev is not None else None
        if mode is None or ram is None:
            return self._blank(dev)
        state = (ram.generation, dev.mode_changes, mode)
        change = Change()
        if self._seen is None or self._seen[2] != mode or self._seen[0] != ram.generation:
            if (mode.width, mode.height) != (self.width, self.height):
                self._resize(mode.width, mode.height)
                change.resized = True
            self._verify = VERIFY_REFRESHES
            rows: range | list[int] = range(self.height)
            if ram.slot is not None:
                ram.dirty_log()                  # start a fresh log with the full compare
        else:
            rows = self._candidate_rows(ram, mode)
        self._seen = state
        self.mode = mode
        self.big_endian = mode.big_endian
        mm = ram.mm
        w4, stride, off = mode.width * 4, mode.stride, mode.offset
        shadow = self.shadow
        if change.resized:
            shadow[:] = self._read_frame(mm, mode)
            change.tiles = self.all_tiles()
            return change
        if self.use_c:
            return self._refresh_c(change, mm, mode, rows, scrolls)
        if isinstance(rows, range) and stride == w4:
            if mm[off:off + w4 * self.height] == shadow:
                return change                     # nothing at all (one compare)
        changed = []
        for r in rows:
            a = off + r * stride
            if mm[a:a + w4] != shadow[r * w4:(r + 1) * w4]:
                changed.append(r)
        self.rows_compared += len(rows)
        if not changed:
            return change
        if self._verify:
            self._verify -= 1
        new = self._read_rows(mm, mode, changed)
        if scrolls and len(changed) > self.height // 2:
            old_rows = [bytes(shadow[r * w4:(r + 1) * w4]) for r in range(self.height)]
            self._scroll(change, old_rows, [new.get(r, old_rows[r]) for r in range(self.height)])
        change.tiles |= self._changed_tiles(new, changed)
        for r in changed:
            shadow[r * w4:(r + 1) * w4] = new[r]
        return change

    def _refresh_c(self, change: Change, mm, mode: Mode, rows, scrolls: bool) -> Change:
        """The same comparison in C (``fast.fb_diff``): candidate rows are snapshot into the
        spare shadow and compared there, then the shadows swap."""
        ffi, lib = fast.ffi, fast.lib
        h, w4 = self.height, mode.width * 4
        cand = ffi.NULL
        if not isinstance(rows, range):
            marks = bytearray(h)
            for r in rows:
                marks[r] = 1
            cand = ffi.from_buffer(marks)
        tiles = bytearray(self.tiles_x * self.tiles_y)
        self.rows_compared += len(rows)
        old, new = self.shadow, self._spare
        fb = ffi.from_buffer("uint8_t[]", mm)
        n = lib.fb_diff(fb + mode.offset, mode.stride, ffi.from_buffer(old),
                        ffi.from_buffer(new), mode.width, h, cand, ffi.from_buffer(tiles), TILE)
        if not n:
            return change
        if self._verify:
            self._verify -= 1
        if scrolls and n > h // 2:
            self._scroll(change, [bytes(old[r * w4:(r + 1) * w4]) for r in range(h)],
                         [bytes(new[r * w4:(r + 1) * w4]) for r in range(h)])
        change.tiles = {i for i, t in enumerate(tiles) if t}
        self.shadow, self._spare = new, old
        return change

    def _blank(self, dev: BochsDisplay | None) -> Change:
        """No mode: a black frame of the last size (the client keeps its window)."""
        change = Change()
        if self.mode is not None or self._seen is None:
            self._seen = (-1, -1, None)
            self.mode = None
            if any(self.shadow):
                self.shadow[:] = bytes(len(self.shadow))
                change.tiles = self.all_tiles()
        return change

    def _resize(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.shadow = bytearray(width * height * 4)
        self._spare = bytearray(width * height * 4)

    def _candidate_rows(self, ram, mode: Mode) -> range | list[int]:
        """The rows the dirty log says were written (all rows without a usable log)."""
        if not (self.dirty_log_allowed and self.dirty_log_trusted) or ram.slot is None:
            return range(self.height)
        bitmap = ram.dirty_log()
        if bitmap is None:
            return range(self.height)
        logged = self._rows_of_pages(bitmap, mode)
        if self._verify or self.refreshes % AUDIT_EVERY == 0:
            # Check the log: a row that changed where no page was logged means this KVM's log
            # misses writes (emulated guest code on kvm-pvm): compare from now on.
            w4 = mode.width * 4
            mm, shadow = ram.mm, self.shadow
            for r in range(self.height):
                a = mode.offset + r * mode.stride
                if r not in logged and mm[a:a + w4] != shadow[r * w4:(r + 1) * w4]:
                    log.info("fbuf: KVM's dirty page log missed a framebuffer write; "
                             "comparing tiles instead")
                    self.dirty_log_trusted = False
                    return range(self.height)
        return sorted(logged)

    def _rows_of_pages(self, bitmap: bytes, mode: Mode) -> set[int]:
        rows: set[int] = set()
        stride, off, h, w4 = mode.stride, mode.offset, self.height, mode.width * 4
        for i, byte in enumerate(bitmap):
            if not byte:
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    start = (i * 8 + bit) * PAGE
                    first = max(0, (start - off - w4) // stride + 1)
                    last = min(h - 1, (start + PAGE - 1 - off) // stride)
                    if last >= first:
                        rows.update(range(first, last + 1))
        return rows

    def _read_frame(self, mm, mode: Mode) -> bytes:
        w4 = mode.width * 4
        if mode.stride == w4:
            return mm[mode.offset:mode.offset + w4 * mode.height]
        return b"".join(mm[mode.offset + r * mode.stride:mode.offset + r * mode.stride + w4]
                        for r in range(mode.height))

    def _read_rows(self, mm, mode: Mode, rows: list[int]) -> dict[int, bytes]:
        w4, stride, off = mode.width * 4, mode.stride, mode.offset
        return {r: mm[off + r * stride:off + r * stride + w4] for r in rows}

    def _changed_tiles(self, new: dict[int, bytes], rows: list[int]) -> set[int]:
        w4, tx_n = self.width * 4, self.tiles_x
        shadow = self.shadow
        tiles: set[int] = set()
        for r in rows:
            base = (r // TILE) * tx_n
            row = new[r]
            s0 = r * w4
            for tx in range(tx_n):
                t = base + tx
                if t in tiles:
                    continue
                a, b = tx * TILE * 4, min((tx + 1) * TILE * 4, w4)
                if row[a:b] != shadow[s0 + a:s0 + b]:
                    tiles.add(t)
        return tiles

    # -- scrolling -----------------------------------------------------------------------
    def _scroll(self, change: Change, old: list[bytes], cur: list[bytes]) -> None:
        """Find k such that new row i == old row i + k for most rows (a scroll up by k)."""
        w4, h = self.width * 4, self.height
        common = Counter(old).most_common(1)[0][0]
        where: dict[bytes, list[int]] = {}
        for r, row in enumerate(old):
            if row != common:
                where.setdefault(row, []).append(r)
        votes: Counter[int] = Counter()
        for i in range(0, h, 7):
            for j in where.get(cur[i], ())[:4]:
                if j > i:
                    votes[j - i] += 1
        if not votes:
            return
        k = votes.most_common(1)[0][0]
        same = sum(1 for i in range(h - k) if cur[i] == old[i + k])
        if same < (h - k) * 3 // 4 or same <= sum(1 for i in range(h) if cur[i] == old[i]):
            return
        change.scroll = k
        # After the copy the client has old[i + k] in rows < h - k and old rows below.
        moved = [old[i + k] if i < h - k else old[i] for i in range(h)]
        tx_n = self.tiles_x
        for i in range(h):
            if cur[i] == moved[i]:
                continue
            base = (i // TILE) * tx_n
            for tx in range(tx_n):
                a, b = tx * TILE * 4, min((tx + 1) * TILE * 4, w4)
                if cur[i][a:b] != moved[i][a:b]:
                    change.residual.add(base + tx)

    # -- pixels for the encoders ---------------------------------------------------------
    def rect(self, x: int, y: int, w: int, h: int) -> bytes:
        """The shadow's pixels of a rectangle, rows packed, in the guest's byte order."""
        w4 = self.width * 4
        if x == 0 and w == self.width:
            return bytes(self.shadow[y * w4:(y + h) * w4])
        a, b = x * 4, (x + w) * 4
        return b"".join(self.shadow[r * w4 + a:r * w4 + b] for r in range(y, y + h))
