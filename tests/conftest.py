"""Every test session keeps its VMs' state directories (vmrun.instances) to itself: a short
private VMRUN_STATE_DIR (unix socket paths are at most 107 bytes), so that test runs of
several checkouts on one host never see each other's VM names, and nothing lands in /run."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


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
