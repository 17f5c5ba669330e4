"""Helpers and fixtures moved unchanged from tests/test_locks.py when the tests were split into unit/ and e2e/
(issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_locks.py,
unit/test_locks.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

from fft_dist import locks


OTHER_HOST = {"pid": 4242, "host": "node-gone", "started": "2026-01-01T00:00:00+0000", "token": "ab" * 16,
              "pidns": "pid:[1]", "slurm_job": "", "slurm_restart": 0, "lease_s": locks.LEASE_S}


def write_lease(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / locks.LEASE_FILE
    path.write_text(json.dumps({**OTHER_HOST, "renewed": time.time(), **fields}))
    return path
