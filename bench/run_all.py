"""Run every benchmark and print its figures (make bench)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

for script in ("exit_rate.py", "eventloop.py", "boot.py", "blk.py", "blk.py --device ahci"):
    path, *args = (HERE / script).as_posix().split()
    path = Path(path)
    if path.exists():
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(path), *args], check=False)
