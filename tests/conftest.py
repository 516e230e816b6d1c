"""The end-to-end boots run on one pytest-xdist worker, in order (``xdist_group``), while
the other workers take the unit and KVM tests: ``make test`` runs ``-n 2 --dist loadgroup``,
so the minutes a boot spends in the emulated guest kernel overlap the rest of the suite.

Every test session keeps its VMs' state directories (vmrun.instances) to itself: a short
private VMRUN_STATE_DIR (unix socket paths are at most 107 bytes), so that test runs of
several checkouts on one host never see each other's VM names, and nothing lands in /run."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.xdist_group("e2e"))


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir():
    if os.environ.get("VMRUN_STATE_DIR"):
        yield
        return
    d = tempfile.mkdtemp(prefix="vmrun-state-")
    os.environ["VMRUN_STATE_DIR"] = d
    try:
        yield
    finally:
        os.environ.pop("VMRUN_STATE_DIR", None)
        shutil.rmtree(d, ignore_errors=True)
