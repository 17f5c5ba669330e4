"""One local rank runs in the launcher's own process (no torchrun, no second interpreter), and keeps
the stop-signal contract of tests/test_launch.py: a stop signal during training checkpoints and
exits 75; one before the rank started exits 76 with nothing written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import catches_signal, child_env, children, fft_dist, read_metrics, REPO, TINY_JOB
from fft_dist import checkpoint as ckpt
from fft_dist.exit_codes import PREEMPTED, STOPPED_NO_CHECKPOINT

SINGLE = ["parallelism=none", "launcher.nproc_per_node=1", "train.global_batch_size=2"]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run_dir}", *TINY_JOB, *SINGLE,
                             "train.max_steps=400", *overrides], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_one_rank_trains_in_the_launchers_process_and_a_stop_signal_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = start(run)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").exists() and '"loss"' in (run / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    assert children(proc.pid) == [], "one local rank needs no torchrun agent or rank process"
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED, f"{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err and "running 1 rank in this process" in out
    found = ckpt.find_resume("auto", run / "checkpoints")
    assert found is not None and ckpt.verify_checkpoint(found) == []
    assert found.name == f"step-{max(r['step'] for r in read_metrics(run) if 'loss' in r):07d}"


def test_signal_before_the_rank_starts_exits_76(tmp_path):
    run = tmp_path / "run"
    proc = start(run)
    deadline = time.time() + 60
    while not catches_signal(proc.pid, signal.SIGTERM) and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED_NO_CHECKPOINT, err[-3000:]
    assert "nothing trained, nothing saved" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()


def test_launcher_env_keeps_a_separate_rank_process_and_the_dry_run_says_which(tmp_path):
    inproc = fft_dist("train", f"run.dir={tmp_path / 'a'}", *TINY_JOB, *SINGLE, "launcher.dry_run=true")
    assert inproc.returncode == 0 and "in its own process" in inproc.stdout
    assert inproc.stdout.strip().splitlines()[-1].endswith("-m fft_dist.train")
    agent = fft_dist("train", f"run.dir={tmp_path / 'b'}", *TINY_JOB, *SINGLE, "launcher.dry_run=true",
                     "+launcher.env.MALLOC_ARENA_MAX=2")
    assert agent.returncode == 0 and "torch.distributed.run" in agent.stdout


def test_stray_launcher_variables_in_the_environment_do_not_reach_the_in_process_rank(tmp_path):
    """Inside e.g. a SLURM allocation MASTER_ADDR / WORLD_SIZE may be exported; torchrun used to overwrite them."""
    env = child_env(MASTER_ADDR="10.255.255.1", MASTER_PORT="1", WORLD_SIZE="8", LOCAL_RANK="3")
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", *TINY_JOB, *SINGLE, "train.max_steps=2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 1 ranks" in proc.stdout and [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]


def test_one_rank_zero3_runs_in_the_launchers_process(tmp_path):
    """DeepSpeed reads LOCAL_RANK to pick its device; torchrun would set it for its only rank, so the
    in-process rank does too (a KeyError: 'LOCAL_RANK' before)."""
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", *TINY_JOB, "parallelism=zero3", "launcher.nproc_per_node=1",
                    "train.global_batch_size=2", "train.max_steps=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]
