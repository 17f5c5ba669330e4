"""bench/startup.py keeps running: one round of the single-process pair, with its per-phase timeline."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, child_env


@pytest.mark.slow  # two one-process jobs of 2 steps: ~20 s on a shared 2-core machine
def test_startup_bench_times_each_phase_of_a_one_rank_run(tmp_path):
    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "startup.py"), "--repeat", "1", "--no-record",
                           "--json", str(out), "--variants", "fft-dist none", "hand single"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = json.loads(out.read_text())
    ours, loop = runs["fft-dist none"][0], runs["hand single"][0]
    assert ours["processes"] == 1 and loop["processes"] == 1  # one rank runs in the launcher's process
    events = ours["events"]
    order = ["launcher: compose + validate", "launcher: preflight checks", "launcher: rank runs in this process",
             "rank: config loaded", "rank: process group", "rank: data (encode or cache)",
             "rank: model build + strategy setup", "rank: first step done"]
    assert [events[e] for e in order] == sorted(events[e] for e in order), events
    assert 0 < ours["outside_steps_s"] < ours["wall_s"]
    assert "| fft-dist none |" in proc.stdout and "seconds since the command started" in proc.stdout
