"""A stop signal during an asynchronous save (issue 21), through the real trainer at 2 ranks: the save in
flight is finished, the current step's checkpoint is written after it (the second save waited for the
first), and the run exits 75 with both committed. The kill -9 cases are in test_checkpoint.py, exact
resume from asynchronously saved checkpoints in test_checkpoint_runs.py."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from checkpoint_runs import ODD_TIED_JOB, stop_train_ranks
from helpers import REPO, child_env, read_metrics
from fft_dist import checkpoint as ckpt


@pytest.mark.slow
def test_a_stop_signal_during_an_async_save_finishes_it_then_saves_the_current_step(tmp_path):
    run = tmp_path / "run"
    job = [o for o in ODD_TIED_JOB if not o.startswith(("train.max_steps=", "checkpoint.every_steps=",
                                                        "eval.every_steps="))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "--monitor_interval", "0.2", "-m", "fft_dist.train", f"run.dir={run}", "parallelism=fsdp", *job,
           "train.max_steps=60", "eval.every_steps=0", "checkpoint.every_steps=2", "checkpoint.async_save=on"]
    # every rank's writer pauses 5 s after its model shard of step 2: the signal lands while it is written
    env = {**child_env(), "FFT_DIST_FAULT_KILL_AT": "after_model_shards", "FFT_DIST_FAULT_KILL_RANK": "all",
           "FFT_DIST_FAULT_KILL_STEP": "2", "FFT_DIST_FAULT_DELAY_S": "5"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = run / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if root.is_dir() and len(list(root.glob("step-0000002.*.tmp/model/*.safetensors"))) == 2:
            break
        time.sleep(0.01)
    out = stop_train_ranks(proc)
    assert "checkpoints are asynchronous" in out
    saves = {r["checkpoint_step"]: r for r in read_metrics(run) if r.get("event") == "checkpoint"}
    k = max(saves)
    assert sorted(saves) == [2, k] and 2 < k < 60, saves  # the save in flight, then the current step's
    for step in (2, k):
        assert ckpt.verify_checkpoint(root / f"step-{step:07d}") == []
    assert (root / "latest").read_text().strip() == f"step-{k:07d}"
    assert ckpt.find_resume("auto", root) == root / f"step-{k:07d}"
    # step k's save waited for step 2's (the writer's pause); step 2's blocked training only for its copy
    assert saves[k]["ckpt_block_s"] > 1.0 and saves[2]["ckpt_block_s"] < 1.0
    assert saves[2]["ckpt_write_s"] > 4.0
    assert "was still being written when the next one was due" in out
