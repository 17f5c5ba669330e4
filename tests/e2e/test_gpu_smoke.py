"""Ready for the day a GPU machine is lent (issue 17): bench/gpu_smoke.sh refuses a machine without a
GPU with its documented code, and its sync counter works inside a real rank."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO, TINY_JOB, child_env, fft_dist

SMOKE = REPO / "bench" / "gpu_smoke.sh"


def test_smoke_script_parses_and_says_there_is_no_gpu():
    assert subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True).returncode == 0
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_bytes()
    proc = subprocess.run([str(SMOKE)], cwd="/", env=child_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 77, proc.stderr  # documented in bench/gpu_smoke.py and README: skipped, no GPU
    assert "no CUDA GPU is visible" in proc.stderr and "nothing was run" in proc.stderr
    assert results.read_bytes() == before
    bad = subprocess.run([str(SMOKE), "--steps", "1"], env=child_env(PYTHON=sys.executable), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--steps" in bad.stderr


def test_sync_counter_logs_every_step_of_a_real_rank(tmp_path):
    """The hook the smoke puts on PYTHONPATH wraps init_distributed and Trainer.train_step of a real
    run (on CPU there is no sync debug mode, so each step logs 0 syncs)."""
    log = tmp_path / "syncs.tsv"
    env = child_env(SMOKE_SYNC_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench" / "smoke_hook"), env["PYTHONPATH"]])
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", "parallelism=fsdp", "launcher.nproc_per_node=1",
                    *TINY_JOB, "train.max_steps=3", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    assert rows == [["0", str(i), "0", "0"] for i in (1, 2, 3)]
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from gpu_smoke import sync_counts
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert sync_counts(log) == {"sync_median": 0, "sync_max": 0, "sync_first": 0, "steps_seen": 3}
