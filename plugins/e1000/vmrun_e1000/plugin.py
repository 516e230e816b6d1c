"""Registers ``e1000`` (and bhyve's name for it, ``e82545``): an Intel 82545EM on any of the
shared network backends (``user`` through passt, ``tap``, ``socket``)."""

from __future__ import annotations

from typing import Any

from vmrun.api import (
    NET_OPTIONS,
    DeviceContext,
    DeviceType,
    check_net_options,
    hookimpl,
    nic_mac,
    open_net_backend,
)
from vmrun_e1000.device import E1000


def _factory(ctx: DeviceContext, opts: dict[str, Any]) -> E1000:
    backend = open_net_backend(ctx, opts)
    return E1000(backend, nic_mac(ctx, opts), name=f"e1000 {ctx.id}")


SUMMARY = "Intel 82545EM gigabit Ethernet (Linux e1000, Windows inbox driver)"


@hookimpl
def vmrun_register_devices(register) -> None:
    register(DeviceType("e1000", SUMMARY, _factory, list(NET_OPTIONS), check=check_net_options))
    register(DeviceType("e82545", f"{SUMMARY}; bhyve's name for e1000", _factory,
                        list(NET_OPTIONS), check=check_net_options))
