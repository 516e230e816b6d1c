"""Registers ``virtio-net``: the shared NIC backend keys (``vmrun.api.NET_OPTIONS``) plus the
queue size."""

from __future__ import annotations

from typing import Any

from vmrun.api import (
    NET_OPTIONS,
    DeviceContext,
    DeviceType,
    Option,
    VirtioPciTransport,
    check_net_options,
    hookimpl,
    nic_mac,
    open_net_backend,
)
from vmrun_virtio_net.device import VirtioNet


def _queue_size(value: int) -> None:
    if value & (value - 1):
        raise ValueError("must be a power of two")


def _factory(ctx: DeviceContext, opts: dict[str, Any]) -> VirtioPciTransport:
    backend = open_net_backend(ctx, opts)
    return VirtioPciTransport(VirtioNet(backend, nic_mac(ctx, opts),
                                        queue_size=opts["queue_size"]))


OPTIONS = [*NET_OPTIONS,
           Option("queue_size", "int", "receive and transmit queue size (a power of two)", 256,
                  min=16, max=1024, validate=_queue_size)]


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType("virtio-net", "virtio network card (user/passt, tap or socket link)",
                        _factory, OPTIONS, check=check_net_options))
