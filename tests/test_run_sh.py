"""``make test``'s runner (tests/run.sh) as CI starts it on a clean machine, with a stand-in
for pytest: no e2e directory exists yet, and every run must still start.

The stand-in fails as pytest does when ``--basetemp``'s parent is missing (pytest creates the
directory itself but not its parents: a fresh machine's first ``make test`` once errored in
every end-to-end test that way, in 3 seconds).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTEST = """#!/usr/bin/env bash
echo "$*" >> "{calls}"
prev=
for a in "$@"; do
    if [ "$prev" = --basetemp ] && [ ! -d "$(dirname "$a")" ]; then
        echo "FileNotFoundError: $(dirname "$a")" >&2
        exit 1
    fi
    prev=$a
done
exit 0
"""


def test_a_fresh_machine_gets_its_e2e_directory_and_all_three_runs(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTEST.format(calls=calls))
    fake.chmod(0o755)
    e2e_tmp = tmp_path / "not" / "there" / "yet"
    env = os.environ | {"PY": str(fake), "VMRUN_E2E_TMP": str(e2e_tmp),
                        "VMRUN_UNITS_LOG": str(tmp_path / "units.log"),
                        "VMRUN_DEVICES_LOG": str(tmp_path / "devices.log")}
    r = subprocess.run(["bash", str(REPO / "tests" / "run.sh")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = calls.read_text().splitlines()
    assert len(runs) == 3, runs
    assert sum(f"--basetemp {e2e_tmp}/" in run for run in runs) == 2, runs   # two e2e runs
    assert any("not e2e and not e2e_pending" in run for run in runs), runs   # the unit run
    assert e2e_tmp.is_dir()
