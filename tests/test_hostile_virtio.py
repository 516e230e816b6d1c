"""A hostile virtio driver (vmrun.testing.hostile) against every virtio device.

Each example builds a fresh FakeVm (4 MiB) with one device, sets it up legitimately, plays a
hypothesis-generated sequence of legitimate and hostile driver steps, then checks the
invariants (nothing escapes to the vCPU or the loop, used elements are sane, memory and time
are bounded) and that a reset + set-up + one good request works again.

``VMRUN_FUZZ=1`` (``make fuzz``) selects the "fuzz" settings: many more examples (scale them
with ``VMRUN_FUZZ_SCALE``, default 10) and longer sequences.
"""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrun_virtio_blk.device import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlk,
)

from vmrun.block import RawFile, SparseSplitDisk
from vmrun.devices.virtio_rnd import VirtioRng
from vmrun.testing.hostile import HostileDriver, HostileFailure, Profile, actions

FUZZ = os.environ.get("VMRUN_FUZZ") == "1"
SCALE = int(os.environ.get("VMRUN_FUZZ_SCALE", "10")) if FUZZ else 1
SEQ = 80 if FUZZ else 30
_health = [HealthCheck.too_slow, HealthCheck.data_too_large,
           HealthCheck.function_scoped_fixture]
settings.register_profile("ci", deadline=None, suppress_health_check=_health,
                          print_blob=True)
settings.register_profile("fuzz", deadline=None, suppress_health_check=_health,
                          print_blob=True)
PROFILE = settings.get_profile("fuzz" if FUZZ else "ci")


def budget(n: int) -> settings:
    return settings(PROFILE, max_examples=n * SCALE)


# -- virtio-rnd ---------------------------------------------------------------------------------
rnd_request = st.tuples(
    st.lists(st.binary(max_size=32), max_size=2),
    st.lists(st.one_of(st.sampled_from([0, 1, 64, 4096, 65536, 65537, 300000]),
                       st.integers(1, 2048)), max_size=4))


def rnd_good(h: HostileDriver) -> None:
    q = h.drv.queues[0]
    head, (buf,) = q.add([], [64])
    h.drv.kick(0)
    n = h.wait_used(q, head)
    data = h.mem.read(buf, 64)
    limited = h.transport.device.rate
    if not (n == 64 or (limited and 0 < n < 64)):
        raise HostileFailure(f"rnd answered {n} bytes for a 64-byte buffer")
    if n >= 4 and data[:n] == b"\xee" * n or data[n:] != b"\xee" * (64 - n):
        raise HostileFailure(f"rnd wrote {data.hex()} for {n} bytes")


RND = Profile("virtio-rnd", lambda: VirtioRng(), rnd_request, rnd_good)
RND_LIMITED = Profile("virtio-rnd-limited", lambda: VirtioRng(rate=64 * 1024), rnd_request,
                      rnd_good)


# -- virtio-blk ---------------------------------------------------------------------------------
IMAGE_SIZE = 64 * 1024
SECTORS = IMAGE_SIZE // 512
_dir = Path(tempfile.mkdtemp(prefix="vmrun-hostile-"))
_counter = itertools.count()
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(4096)) * (IMAGE_SIZE // 4096)

blk_types = st.one_of(st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH,
                                       VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
                                       VIRTIO_BLK_T_WRITE_ZEROES]),
                      st.integers(0, 0xFFFFFFFF))
sectors = st.one_of(st.sampled_from([0, 1, SECTORS - 1, SECTORS, SECTORS - 8, 1 << 55,
                                     (1 << 64) - 1]), st.integers(0, SECTORS + 8),
                    st.integers(0, (1 << 64) - 1))
data_len = st.one_of(st.sampled_from([0, 512, 1024, 4096, 8192]), st.integers(0, 9000))
segment = st.tuples(sectors, st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)),
                    st.integers(0, 3)).map(lambda t: struct.pack("<QII", t[0], t[1], t[2]))


@st.composite
def blk_request(draw) -> tuple[list[bytes], list[int]]:
    rtype, sector = draw(blk_types), draw(sectors)
    hdr = struct.pack("<IIQ", rtype, draw(st.integers(0, 3)), sector)
    if draw(st.integers(0, 9)) == 0:
        hdr = hdr[:draw(st.integers(0, 15))]                # a short header
    readable = [hdr]
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        readable += [b"".join(draw(st.lists(segment, max_size=4)))]
    elif rtype == VIRTIO_BLK_T_OUT or draw(st.booleans()):
        n = draw(data_len)
        readable += [bytes([n & 0xFF]) * n]
    if rtype == VIRTIO_BLK_T_IN:
        writable = [draw(data_len), 1]
    else:
        writable = draw(st.lists(st.sampled_from([0, 1, 20, 512]), max_size=2)) + [1]
    if draw(st.integers(0, 9)) == 0:
        writable = draw(st.lists(st.integers(0, 600), max_size=3))   # no status byte
    return readable, writable


def blk_good(h: HostileDriver) -> None:
    q = h.drv.queues[0]
    head, (data, status) = q.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
    h.drv.kick(0)
    n = h.wait_used(q, head)
    st_byte = h.mem.read(status, 1)[0]
    got = h.mem.read(data, 512)
    want = h.profile.extra["sector0"](h)
    if n != 513 or st_byte != VIRTIO_BLK_S_OK or got != want:
        raise HostileFailure(f"read of sector 0 after reset: used {n}, status {st_byte}, "
                             f"data {'ok' if got == want else 'differs from the image'}")


def _raw(nocache: bool) -> Profile:
    def make():
        p = _dir / f"raw{next(_counter)}.img"
        p.write_bytes(PATTERN)
        prof.extra["path"] = p
        return VirtioBlk(RawFile(p, nocache=nocache), workers=2, queue_size=64)

    def sector0(h: HostileDriver) -> bytes:
        with open(h.transport.device.backend.path, "rb") as f:
            return f.read(512)

    prof = Profile("virtio-blk-nocache" if nocache else "virtio-blk", make, blk_request(),
                   blk_good, extra={"sector0": sector0})
    return prof


def _sparse() -> Profile:
    def make():
        base = _dir / f"sparse{next(_counter)}.img"
        disk = SparseSplitDisk(base, size=IMAGE_SIZE, sparse=True)
        disk.writev(0, [memoryview(bytearray(PATTERN[:8192]))])
        return VirtioBlk(disk, workers=2, queue_size=64)

    def sector0(h: HostileDriver) -> bytes:
        buf = bytearray(512)              # read on the host side, through its own backend
        h.transport.device.backend.readv(0, [memoryview(buf)])
        return bytes(buf)

    return Profile("virtio-blk-sparse", make, blk_request(), blk_good,
                   extra={"sector0": sector0})


BLK_RAW, BLK_NOCACHE, BLK_SPARSE = _raw(False), _raw(True), _sparse()


def play(profile: Profile, acts: list[tuple]) -> None:
    try:
        with HostileDriver.create(profile) as h:
            h.run(acts)
    finally:
        for f in _dir.iterdir():
            f.unlink()


@pytest.fixture(scope="module", autouse=True)
def _images():
    yield
    shutil.rmtree(_dir, ignore_errors=True)


@budget(700)
@given(acts=actions(RND, SEQ))
def test_hostile_rnd(acts) -> None:
    play(RND, acts)


@budget(300)
@given(acts=actions(RND_LIMITED, SEQ))
def test_hostile_rnd_rate_limited(acts) -> None:
    play(RND_LIMITED, acts)


@budget(500)
@given(acts=actions(BLK_RAW, SEQ))
def test_hostile_blk_raw(acts) -> None:
    play(BLK_RAW, acts)


@budget(150)
@given(acts=actions(BLK_NOCACHE, SEQ))
def test_hostile_blk_nocache(acts) -> None:
    play(BLK_NOCACHE, acts)


@budget(350)
@given(acts=actions(BLK_SPARSE, SEQ))
def test_hostile_blk_sparse(acts) -> None:
    play(BLK_SPARSE, acts)


# -- the harness catches what it should ------------------------------------------------------
def test_harness_reports_an_exception_escaping_to_the_vcpu(monkeypatch) -> None:
    with HostileDriver.create(RND) as h:
        def boom(*a):
            raise RuntimeError("boom")
        monkeypatch.setattr(h.vm.mmio, "read", boom)
        with pytest.raises(HostileFailure, match="raised RuntimeError"):
            h.run([("common_read", 0x12, 2)])


def test_harness_reports_a_bad_used_element() -> None:
    with HostileDriver.create(RND) as h:
        h.setup()
        h.transport.queues[0].push_used(7, 10)         # never popped
        with pytest.raises(HostileFailure, match="was not popped"):
            h.check()


def test_harness_reports_memory_growth(monkeypatch) -> None:
    hoard = []
    with HostileDriver.create(RND, max_memory=8 << 20) as h:
        monkeypatch.setattr(h, "do_wait", lambda ms: hoard.append(bytearray(16 << 20)))
        with pytest.raises(HostileFailure, match="host memory grew"):
            h.run([("wait", 0)])


# -- regressions the fuzzer found ---------------------------------------------------------------
class SlowRaw(RawFile):
    def readv(self, offset, bufs):
        time.sleep(0.05)
        return super().readv(offset, bufs)


def test_completion_in_flight_at_close_is_dropped(tmp_path) -> None:
    """Closing a VM (a reboot) with reads in flight: their completions reached the loop after
    the transport was closed and, while the interrupt source closed its eventfds, raised
    EBADF there (with the fd number reused: signalled somebody else's eventfd). The
    transport now stops before the device closes; late completions are dropped."""
    p = tmp_path / "d.img"
    p.write_bytes(PATTERN)
    prof = Profile("slow", lambda: VirtioBlk(SlowRaw(p), workers=2), blk_request(), blk_good)
    h = HostileDriver.create(prof)
    try:
        h.setup()
        q = h.drv.queues[0]
        for _ in range(4):
            q.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        h.do_kick(0)
        gsi = h.transport.msix.gsis[1]
        h.transport.close()           # drains: the four completions go to the loop
        h.sync()
        assert q.used_idx() == 0
        assert h.vm.msi_count(gsi) == 0
    finally:
        h.close()                     # HostileFailure if the teardown faulted on the loop
    assert h.vm.loop.faults == []
