"""Helpers of tests/e2e/test_deepspeed.py, moved here unchanged when the tests were split into unit/ and e2e/:
used by e2e/test_deepspeed.py, unit/test_deepspeed.py."""
from __future__ import annotations

import subprocess


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc
