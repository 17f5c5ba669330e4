"""No rank outlives its supervisor (issue #15 items 6 and 7): real launchers, real `kill -9`.

The start-up race (the launcher dies before a rank arms its death signal) is made deterministic by a
hook in tests/support/hooks/pause_rank that holds each rank just before it arms it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY_JOB, alive, child_env, descendants, read_metrics, SUPPORT

HOOK = SUPPORT / "hooks" / "pause_rank"


def gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive after `seconds` (killed afterwards, so a failing test leaves nothing behind)."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def test_ranks_whose_launcher_died_before_they_armed_their_death_signal_stop(tmp_path):
    pause = tmp_path / "pause"
    pause.mkdir()
    env = child_env(FFT_DIST_TEST_PAUSE_DIR=str(pause))
    env["PYTHONPATH"] = f"{HOOK}{os.pathsep}{env['PYTHONPATH']}"
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run}", *TINY_JOB,
                             "train.max_steps=400"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list(pause.glob("paused-*"))) < 2:
            assert proc.poll() is None and time.time() < deadline, "the ranks never reached the hook"
            time.sleep(0.05)
        ranks = [int(p.name.split("-")[1]) for p in pause.glob("paused-*")]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        (pause / "go").touch()  # now the ranks go on, their launcher long gone
        left = gone_within(ranks, 15)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert not left, f"ranks {left} outlived their launcher"
    assert not (run / "metrics.jsonl").exists() or not [r for r in read_metrics(run) if "loss" in r]


@pytest.mark.slow
def test_kill_9_of_the_deepspeed_launcher_stops_its_runner_and_ranks(tmp_path):
    run = tmp_path / "run"
    job = ["launch", f"run.dir={run}", *TINY_JOB, "launcher=deepspeed", "parallelism=zero2", "train.max_steps=400",
           "checkpoint.every_steps=1", "checkpoint.keep_last=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "fft_dist.cli", *job], cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    below: list[int] = []
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or '"loss"' not in (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, "training never started"
            time.sleep(0.05)
        below = descendants(proc.pid)  # DeepSpeed's runner, its launch process, the ranks
        assert len(below) >= 4, below
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = gone_within(below, 15)
    finally:
        for p in below:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"{len(left)} processes of the job outlived its launcher"
    logged = len(read_metrics(run))
    time.sleep(2)
    assert len(read_metrics(run)) == logged, "nothing trains unsupervised"
    # the run dir is free again, and a resumed job is accepted (no orphan writes beside it)
    resumed = subprocess.run([sys.executable, "-m", "fft_dist.cli", *job[:-3], "train.max_steps=2", "resume=auto",
                              "launcher.dry_run=true"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
