"""Run every benchmark and print its figures (make bench)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

for script, *args in (("exit_rate.py",), ("eventloop.py",), ("boot.py",), ("blk.py",),
                      ("blk.py", "--qcow2"), ("blk.py", "--device", "ahci"), ("xhci.py",)):
    path = HERE / script
    if path.exists():
        print(f"== {' '.join([script, *args])}", flush=True)
        subprocess.run([sys.executable, str(path), *args], check=False)
