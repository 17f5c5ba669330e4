"""Hydra multirun: `fft-dist train -m a=1,2` runs every point, each in its own run directory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fft_dist import checkpoint as ckpt
from helpers import REPO, TINY_JOB, child_env, fft_dist, step_records


def test_a_sweep_hydra_cannot_expand_here_is_a_config_error(tmp_path):
    proc = fft_dist("launch", "-m", "parallelism=glob(zero*)", f"run.dir={tmp_path}/r", "launcher.dry_run=true")
    assert proc.returncode == 2 and "list the values instead" in proc.stderr, proc.stderr


def test_cfg_with_multirun_is_refused():
    proc = fft_dist("train", "-m", "train.lr=1e-3,2e-3", "--cfg", "job")
    assert proc.returncode == 2 and "drop -m" in proc.stderr


@pytest.mark.slow
def test_multirun_trains_each_point_in_its_own_run_dir(tmp_path):
    base = tmp_path / "sweep"
    proc = fft_dist("train", "-m", f"run.dir={base}", *TINY_JOB, "train.lr=1e-3,3e-3", "train.max_steps=3",
                    "eval.every_steps=0", "checkpoint.save_final=false", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multirun summary" in proc.stdout and proc.stdout.count("exit 0") == 2, proc.stdout[-2000:]
    lrs, losses = [], []
    for n in (0, 1):
        cfg = yaml.safe_load((base / str(n) / "config.yaml").read_text())
        lrs.append(cfg["train"]["lr"])
        losses.append([r["loss"] for r in step_records(base / str(n))])
    assert lrs == [1e-3, 3e-3]
    assert len(losses[0]) == len(losses[1]) == 3
    assert losses[0][0] == losses[1][0] and losses[0][2] != losses[1][2]  # same start, different learning rates


@pytest.mark.slow
def test_a_stop_signal_checkpoints_the_running_point_and_ends_the_sweep(tmp_path):
    base = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "train", "-m", f"run.dir={base}", *TINY_JOB,
                             "train.lr=1e-3,3e-3", "train.max_steps=400"], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        metrics = base / "0" / "metrics.jsonl"
        while not metrics.exists() or '"loss"' not in metrics.read_text():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()
    assert proc.returncode == 75, f"{out[-2000:]}\n{err[-3000:]}"
    assert "later points not run" in err and not (base / "1").exists()
    found = ckpt.find_resume("auto", base / "0" / "checkpoints")
    assert found is not None and ckpt.verify_checkpoint(found) == []
