"""virtio-net against the platform's hostile virtio driver (vmrun.testing.hostile): status,
queue set-up, MSI-X and ring scribbles, random receive chains (queue 0) with frames arriving
from a loopback backend; then a reset and one good frame received."""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmrun_virtio_net.device import VirtioNet

from vmrun.core.eventloop import EventLoop
from vmrun.testing.hostile import HostileDriver, HostileFailure, Profile, actions
from vmrun.testing.nic import LoopbackBackend, ethernet

FUZZ = os.environ.get("VMRUN_FUZZ") == "1"
SCALE = int(os.environ.get("VMRUN_FUZZ_SCALE", "10")) if FUZZ else 1
MAC = bytes.fromhex("02aabbccdd01")
GOOD = ethernet(MAC, bytes.fromhex("02aabbccdd02"), 0x0800, b"\x42" * 46)

_loop = EventLoop("net-hostile-backends")
_loop.start()

request = st.tuples(st.lists(st.binary(max_size=16), max_size=1),
                    st.lists(st.one_of(st.sampled_from([0, 1, 12, 60, 1526, 65562, 70000]),
                                       st.integers(1, 4096)), min_size=0, max_size=4))


def make() -> VirtioNet:
    be = LoopbackBackend(_loop)
    for n in (60, 1514, 200):
        be.inject(ethernet(MAC, MAC, 0x0800, bytes(n - 14)))
    return VirtioNet(be, MAC, queue_size=64)


def good(h: HostileDriver) -> None:
    dev = h.transport.device
    be = dev.backend
    q = h.drv.queues[0]
    head, (buf,) = q.add([], [1526])
    h.drv.kick(0)
    be.inject(GOOD)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        for hd, n in q.get_used():
            data = h.mem.read(buf, n) if hd == head else b""
            if data[12:] == GOOD:
                return
            if hd == head:      # an older frame took the buffer: post another
                head, (buf,) = q.add([], [1526])
                h.drv.kick(0)
        time.sleep(0.002)
    raise HostileFailure("virtio-net did not receive the good frame after recovery")


NET = Profile("virtio-net", make, request, good)


@settings(deadline=None, max_examples=150 * SCALE,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(acts=actions(NET, 80 if FUZZ else 30))
def test_hostile_virtio_net(acts) -> None:
    with HostileDriver.create(NET) as h:
        h.run(acts)
