"""bench/gpu.py stays ready for a GPU day: on CPU it runs the tiny model through fft-dist (one rank)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, child_env


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_the_tiny_model(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--model", "tiny", "--steps", "4",
                           "--micro", "2", "--seq", "64", "--no-hf", "--no-record", "--json", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["fft-dist fsdp x1"]
    assert rows[0]["steps"] == 4 and rows[0]["tokens_per_s"] > 0
    assert rows[0]["mfu"] is None  # no peak FLOP/s on CPU: no made-up MFU
    assert rows[0]["deterministic"] is True  # the default users get, not forced off (issue 17)
    assert rows[0]["peak_mem_gib"] > 0
    assert "| fft-dist fsdp x1 |" in proc.stdout and "| True |" in proc.stdout
    assert "GFLOP per token" in proc.stdout and "peak: none (CPU)" in proc.stdout


def test_gpu_bench_refuses_options_it_cannot_honour():
    for argv, why in ((["--gpus", "2"], "--no-hf"), (["--gpus", "0", "--no-hf"], "1 or more")):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), *argv, "--no-record"], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr
