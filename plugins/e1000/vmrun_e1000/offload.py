"""Checksum insertion and TCP segmentation as the 82545EM does them (8254x SDM 3.5, 3.6).

Pure functions on bytes: the device gathers a packet's buffers, then these finish it.

- :func:`ones_sum` / :func:`insert_checksum`: the Internet checksum over a byte range, the
  way the hardware's IPCSS/IPCSO/IPCSE and TUCSS/TUCSO/TUCSE fields describe it: the range
  includes whatever the driver left in the checksum field (its pseudo-header seed for TCP and
  UDP, zero for IPv4), and the result replaces it.
- :func:`segment`: TCP segmentation (TSE): the header (``hdr_len`` bytes) is repeated before
  every ``mss`` bytes of payload; per segment the IPv4 total length and identification (or
  the IPv6 payload length), the TCP sequence number and flags (FIN and PSH only on the last)
  or the UDP length are fixed up, and the checksums inserted. For TCP and UDP the driver
  seeded the pseudo-header sum without a length: each segment's length is added in.
- :func:`tso_as_gso`: the same packet made into one large frame for a backend that takes
  GSO frames (virtio-net header): lengths set for the whole packet, the IPv4 checksum done,
  the TCP checksum left partial (pseudo-header with the whole length).

All offsets come from the guest: anything out of range raises :class:`OffloadError` (the
device counts the packet as failed and drops it, as hardware given a bad context would).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class OffloadError(ValueError):
    """The context's offsets do not fit the packet."""


def ones_sum(data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None,
             seed: int = 0) -> int:
    """The 16-bit one's complement sum (not inverted) of ``data[start:end]`` plus ``seed``.

    2**16 is 1 modulo 0xFFFF, so the sum of the 16-bit words is the big-endian integer of the
    bytes modulo 0xFFFF: one C-speed conversion instead of a Python loop."""
    chunk = data[start:end]
    n = len(chunk)
    v = int.from_bytes(chunk, "big")
    if n & 1:
        v <<= 8
    v += seed
    if v == 0:
        return 0
    return v % 0xFFFF or 0xFFFF


def fold(total: int) -> int:
    """The folded one's complement sum of ``total`` (as :func:`ones_sum` returns it)."""
    if total == 0:
        return 0
    return total % 0xFFFF or 0xFFFF


def insert_checksum(frame: bytearray, css: int, cso: int, cse: int = 0, add: int = 0,
                    udp: bool = False) -> None:
    """Checksum ``frame[css:cse+1]`` (``cse`` 0: to the end) plus ``add``, store it at ``cso``."""
    n = len(frame)
    end = n if cse == 0 else cse + 1
    if css >= n or end > n or end <= css or cso + 2 > n:
        raise OffloadError(f"checksum range {css}..{end} / offset {cso} outside a "
                           f"{n}-byte packet")
    c = ~ones_sum(frame, css, end, add) & 0xFFFF
    if udp and c == 0:
        c = 0xFFFF
    frame[cso:cso + 2] = c.to_bytes(2, "big")


@dataclass(slots=True)
class Context:
    """A transmit context descriptor (checksum offsets, and for TSE the segmentation)."""

    ipcss: int = 0
    ipcso: int = 0
    ipcse: int = 0
    tucss: int = 0
    tucso: int = 0
    tucse: int = 0
    paylen: int = 0
    tucmd: int = 0
    hdr_len: int = 0
    mss: int = 0

    @property
    def tcp(self) -> bool:
        return bool(self.tucmd & 0x01)

    @property
    def ipv4(self) -> bool:
        return bool(self.tucmd & 0x02)


def checksum(frame: bytearray, ctx: Context, ip: bool, l4: bool) -> None:
    """Plain (non-TSO) offload: the IP checksum (IXSM) and/or the TCP/UDP one (TXSM)."""
    if ip:
        insert_checksum(frame, ctx.ipcss, ctx.ipcso, ctx.ipcse)
    if l4:
        insert_checksum(frame, ctx.tucss, ctx.tucso, ctx.tucse, udp=not ctx.tcp)


def _check_tso(packet: bytes | bytearray, ctx: Context) -> None:
    h = ctx.hdr_len
    if ctx.mss == 0:
        raise OffloadError("TSO with MSS 0")
    if h == 0 or h > len(packet):
        raise OffloadError(f"TSO header length {h} for a {len(packet)}-byte packet")
    if ctx.ipv4:
        if ctx.ipcss + 20 > h:
            raise OffloadError(f"TSO IPv4 header at {ctx.ipcss} past the {h}-byte header")
    elif ctx.ipcss + 40 > h:
        raise OffloadError(f"TSO IPv6 header at {ctx.ipcss} past the {h}-byte header")
    need = 20 if ctx.tcp else 8
    if ctx.tucss + need > h:
        raise OffloadError(f"TSO {'TCP' if ctx.tcp else 'UDP'} header at {ctx.tucss} past "
                           f"the {h}-byte header")
    if ctx.tucso + 2 > h or ctx.tucso < ctx.tucss:
        raise OffloadError(f"TSO checksum offset {ctx.tucso} outside the L4 header")


def segment(packet: bytes | bytearray, ctx: Context, ip_csum: bool, l4_csum: bool,
            max_frames: int = 1 << 16) -> list[bytearray]:
    """The frames TSE makes of ``packet`` (header + payload)."""
    _check_tso(packet, ctx)
    h, mss = ctx.hdr_len, ctx.mss
    header = bytes(packet[:h])
    payload = memoryview(packet)[h:]
    total = len(payload)
    nseg = max(1, -(-total // mss))
    if nseg > max_frames:
        raise OffloadError(f"TSO would make {nseg} frames")
    ipcss, tucss = ctx.ipcss, ctx.tucss
    ip_id = struct.unpack_from(">H", header, ipcss + 4)[0] if ctx.ipv4 else 0
    seq = struct.unpack_from(">I", header, tucss + 4)[0] if ctx.tcp else 0
    flags = header[tucss + 13] if ctx.tcp else 0
    frames = []
    for i in range(nseg):
        chunk = payload[i * mss:(i + 1) * mss]
        f = bytearray(header)
        f += chunk
        n = len(f)
        if ctx.ipv4:
            struct.pack_into(">HH", f, ipcss + 2, n - ipcss, (ip_id + i) & 0xFFFF)
        else:
            struct.pack_into(">H", f, ipcss + 4, n - ipcss - 40)
        if ctx.tcp:
            struct.pack_into(">I", f, tucss + 4, (seq + i * mss) & 0xFFFFFFFF)
            if i != nseg - 1:
                f[tucss + 13] = flags & ~0x09          # FIN and PSH on the last one only
        else:
            struct.pack_into(">H", f, tucss + 4, n - tucss)
        if ip_csum:
            insert_checksum(f, ipcss, ctx.ipcso, ctx.ipcse)
        if l4_csum:
            insert_checksum(f, tucss, ctx.tucso, 0, add=n - tucss, udp=not ctx.tcp)
        frames.append(f)
    return frames


def tso_as_gso(packet: bytes | bytearray, ctx: Context, ip_csum: bool) -> bytearray:
    """One GSO frame for a backend that segments (NEEDS_CSUM at TUCSS/TUCSO)."""
    _check_tso(packet, ctx)
    f = bytearray(packet)
    n = len(f)
    if ctx.ipv4:
        struct.pack_into(">H", f, ctx.ipcss + 2, n - ctx.ipcss)
        if ip_csum:
            insert_checksum(f, ctx.ipcss, ctx.ipcso, ctx.ipcse)
    else:
        struct.pack_into(">H", f, ctx.ipcss + 4, n - ctx.ipcss - 40)
    seed = struct.unpack_from(">H", f, ctx.tucso)[0]
    struct.pack_into(">H", f, ctx.tucso, fold(seed + n - ctx.tucss))
    return f


# -- receive side ---------------------------------------------------------------------------
def _l4_check(frame: bytes | bytearray | memoryview, l3: int, l4: int, proto: int,
              src_dst: bytes | memoryview, l4len: int) -> bool:
    """Whether the TCP/UDP checksum of a received packet is right."""
    if proto == 17 and frame[l4 + 6] == 0 and frame[l4 + 7] == 0:
        return True                    # UDP without a checksum
    pseudo = ones_sum(src_dst, 0, None, proto + l4len)
    return ones_sum(frame, l4, l4 + l4len, pseudo) == 0xFFFF


def rx_checksum(frame: bytes | bytearray | memoryview, l3: int, ip_on: bool,
                l4_on: bool) -> tuple[int, int]:
    """(status bits, error bits) of receive checksum offload for the packet at ``l3``:
    IPCS/IPE for an IPv4 header, TCPCS/TCPE for TCP or UDP over IPv4 or IPv6 (no
    extension headers, no fragments). Nothing checked: IXSM."""
    from vmrun_e1000.regs import (
        RXD_ERR_IPE,
        RXD_ERR_TCPE,
        RXD_STAT_IPCS,
        RXD_STAT_IXSM,
        RXD_STAT_TCPCS,
    )

    n = len(frame)
    status = errors = 0
    if n < l3 + 20:
        return RXD_STAT_IXSM, 0
    ethertype = frame[l3 - 2] << 8 | frame[l3 - 1]
    if ethertype == 0x0800 and frame[l3] >> 4 == 4:
        ihl = (frame[l3] & 0xF) * 4
        tot = frame[l3 + 2] << 8 | frame[l3 + 3]
        if ihl < 20 or l3 + ihl > n or tot < ihl or l3 + tot > n:
            return RXD_STAT_IXSM, 0
        if ip_on:
            status |= RXD_STAT_IPCS
            if ones_sum(frame, l3, l3 + ihl) != 0xFFFF:
                errors |= RXD_ERR_IPE
        proto = frame[l3 + 9]
        frag = (frame[l3 + 6] << 8 | frame[l3 + 7]) & 0x3FFF
        if l4_on and proto in (6, 17) and not frag:
            l4, l4len = l3 + ihl, tot - ihl
            if l4len >= (20 if proto == 6 else 8):
                status |= RXD_STAT_TCPCS
                if not _l4_check(frame, l3, l4, proto, frame[l3 + 12:l3 + 20], l4len):
                    errors |= RXD_ERR_TCPE
    elif ethertype == 0x86DD and frame[l3] >> 4 == 6 and n >= l3 + 40:
        proto = frame[l3 + 6]
        plen = frame[l3 + 4] << 8 | frame[l3 + 5]
        l4 = l3 + 40
        if l4_on and proto in (6, 17) and l4 + plen <= n and plen >= (20 if proto == 6 else 8):
            status |= RXD_STAT_TCPCS
            if not _l4_check(frame, l3, l4, proto, frame[l3 + 8:l3 + 40], plen):
                errors |= RXD_ERR_TCPE
    if not status:
        status = RXD_STAT_IXSM
    return status, errors


def complete_partial(frame: bytearray, csum_start: int, csum_offset: int) -> bool:
    """Finish a partial checksum (virtio NEEDS_CSUM) from a backend; False: bad offsets."""
    n = len(frame)
    at = csum_start + csum_offset
    if csum_start >= n or at + 2 > n:
        return False
    c = ~ones_sum(frame, csum_start) & 0xFFFF
    frame[at:at + 2] = c.to_bytes(2, "big")
    return True
