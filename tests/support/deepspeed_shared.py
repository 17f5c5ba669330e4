"""Helpers and fixtures moved unchanged from tests/test_deepspeed.py when the tests were split into unit/ and e2e/
(issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_deepspeed.py,
unit/test_deepspeed.py."""
from __future__ import annotations

import subprocess


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc
