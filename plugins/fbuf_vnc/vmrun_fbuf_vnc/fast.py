"""A small C helper for the two loops that are slow in Python: comparing the frame with its
shadow tile by tile, and ZRLE's per-tile palette analysis and packing.

Built with cffi and the host's C compiler on first use, cached under
``$XDG_CACHE_HOME/vmrun/fbuf`` keyed by the source; where it cannot be built (no compiler),
:data:`lib` is None and the pure Python paths in ``frame.py`` and ``encodings.py`` run (same
results: the tests run both).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger("vmrun.fbuf")

CDEF = """
int fb_diff(const uint8_t *fb, long stride, const uint8_t *old, uint8_t *new_, int w, int h,
            const uint8_t *cand, uint8_t *tiles, int tile);
long zrle_rect(const uint8_t *px, int w, int h, int lane0, int lane1, int lane2, int cpixel3,
               uint8_t *out);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Snapshot the candidate rows of the visible frame into new_ (the others come from old), mark
 * the 64x64 tiles in which they differ from old; returns the number of changed rows. */
int fb_diff(const uint8_t *fb, long stride, const uint8_t *old, uint8_t *new_, int w, int h,
            const uint8_t *cand, uint8_t *tiles, int tile)
{
    long w4 = (long)w * 4;
    int tx_n = (w + tile - 1) / tile, changed = 0;
    for (int r = 0; r < h; r++) {
        const uint8_t *o = old + r * w4;
        uint8_t *n = new_ + r * w4;
        if (cand && !cand[r]) {
            memcpy(n, o, w4);
            continue;
        }
        memcpy(n, fb + r * stride, w4);
        if (memcmp(n, o, w4) == 0)
            continue;
        changed++;
        uint8_t *trow = tiles + (r / tile) * tx_n;
        for (int tx = 0; tx < tx_n; tx++) {
            long a = (long)tx * tile * 4, b = a + (long)tile * 4;
            if (b > w4)
                b = w4;
            if (!trow[tx] && memcmp(n + a, o + a, b - a))
                trow[tx] = 1;
        }
    }
    return changed;
}

static long put_cpixel(uint8_t *out, uint32_t c, int l0, int l1, int l2, int cpixel3)
{
    const uint8_t *b = (const uint8_t *)&c;
    if (!cpixel3) {
        memcpy(out, b, 4);
        return 4;
    }
    out[0] = b[l0]; out[1] = b[l1]; out[2] = b[l2];
    return 3;
}

/* One ZRLE tile of n = tw * th 32-bit pixels (client format): solid (1), packed palette
 * (2..16 colours, 1/2/4 bits an index, rows padded to a byte) or raw CPIXELs (0). */
static long zrle_tile(const uint8_t *px8, int n, int l0, int l1, int l2, int cpixel3,
                      int tw, int th, uint8_t *out)
{
    const uint32_t *px = (const uint32_t *)px8;
    uint32_t pal[17];
    int np = 0;
    uint8_t idx_of_last = 0;
    uint32_t last = px[0];
    pal[np++] = px[0];
    for (int i = 1; i < n && np <= 16; i++) {
        uint32_t c = px[i];
        if (c == last)
            continue;
        int k;
        for (k = 0; k < np && pal[k] != c; k++)
            ;
        if (k == np)
            pal[np++] = c;
        last = c;
    }
    (void)idx_of_last;
    long o = 0;
    if (np == 1) {
        out[o++] = 1;
        return o + put_cpixel(out + o, pal[0], l0, l1, l2, cpixel3);
    }
    if (np > 16) {
        out[o++] = 0;
        for (int i = 0; i < n; i++)
            o += put_cpixel(out + o, px[i], l0, l1, l2, cpixel3);
        return o;
    }
    out[o++] = (uint8_t)np;
    for (int k = 0; k < np; k++)
        o += put_cpixel(out + o, pal[k], l0, l1, l2, cpixel3);
    int bits = np == 2 ? 1 : np <= 4 ? 2 : 4;
    int cur = 0, k = 0;
    last = pal[0];
    for (int y = 0; y < th; y++) {
        uint8_t byte = 0;
        int nb = 0;
        for (int x = 0; x < tw; x++) {
            uint32_t c = px[y * tw + x];
            if (c != last) {
                for (k = 0; pal[k] != c; k++)
                    ;
                cur = k;
                last = c;
            }
            byte = (uint8_t)(byte << bits | cur);
            nb += bits;
            if (nb == 8) {
                out[o++] = byte;
                byte = 0;
                nb = 0;
            }
        }
        if (nb)
            out[o++] = (uint8_t)(byte << (8 - nb));
    }
    return o;
}

/* A whole ZRLE rectangle of w x h 32-bit pixels (rows of w, client format): its 64x64 tiles
 * left to right, top to bottom, each gathered and encoded by zrle_tile. out must hold
 * w * h * 4 bytes plus one per tile (the worst case: every tile raw). */
long zrle_rect(const uint8_t *px, int w, int h, int l0, int l1, int l2, int cpixel3,
               uint8_t *out)
{
    uint8_t tile[64 * 64 * 4];
    long o = 0;
    for (int ty = 0; ty < h; ty += 64) {
        int th = h - ty < 64 ? h - ty : 64;
        for (int tx = 0; tx < w; tx += 64) {
            int tw = w - tx < 64 ? w - tx : 64;
            for (int r = 0; r < th; r++)
                memcpy(tile + (long)r * tw * 4, px + ((long)(ty + r) * w + tx) * 4,
                       (size_t)tw * 4);
            o += zrle_tile(tile, tw * th, l0, l1, l2, cpixel3, tw, th, out + o);
        }
    }
    return o;
}
"""


def _build():
    import cffi

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    key = hashlib.sha256((CDEF + SOURCE + sys.version).encode()).hexdigest()[:16]
    d = Path(base) / "vmrun" / "fbuf"
    name = f"_vmrun_fbuf_{key}"
    found = sorted(d.glob(f"{name}*.so")) if d.is_dir() else []
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        ffi.set_source(name, SOURCE, extra_compile_args=["-O2"])
        tmp = d / f"build-{os.getpid()}"
        built = Path(ffi.compile(tmpdir=str(tmp), verbose=False))
        target = d / built.name
        os.replace(built, target)
        shutil.rmtree(tmp, ignore_errors=True)
        found = [target]
    spec = importlib.util.spec_from_file_location(name, found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi, mod.lib


try:
    if os.environ.get("VMRUN_FBUF_PURE_PYTHON"):
        raise RuntimeError("VMRUN_FBUF_PURE_PYTHON is set")
    ffi, lib = _build()
except Exception as e:   # no compiler, no headers: the Python paths do the same, slower
    log.debug("fbuf: C helper not built (%s): pure Python", e)
    ffi = lib = None
