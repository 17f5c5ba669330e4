"""Stopping a real job: stop signals to the launcher, the process group or one rank checkpoint and exit
75; one before any rank starts exits 76 with nothing written; kill -9 of the launcher stops the ranks
before they write; one run per run directory, never on top of another run's checkpoints; one local rank in
the launcher's own process keeps the same contract; a torchrun group restart after kill -9 of a rank
resumes to bit-identical weights, a restart does not undo a stop signal, and Ctrl-C under the deepspeed
launcher checkpoints and exits 75. Each case checks the exit code, the checkpoint on disk and that no
process of the job is left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    alive, catches_signal, child_env, children, read_metrics, REPO, TINY_JOB, train, SUPPORT, step_records)
from fft_dist import checkpoint as ckpt
from fft_dist.exit_codes import PREEMPTED, STOPPED_NO_CHECKPOINT
from fft_dist.checkpoint import CheckpointReader
from launch_checks import SINGLE, flag, kill_job, launch


LONG_JOB = [*TINY_JOB, "train.max_steps=400"]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """`fft-dist train` in its own session, so a process-group signal reaches only this job."""
    return subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run_dir}", *LONG_JOB,
                             *overrides], cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int = 1, timeout: float = 240) -> list[int]:
    """Wait until `steps` training steps are logged; return the rank pids."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the job ended early: {proc.communicate()}"
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
            ranks = children(proc.pid)
            assert len(ranks) == 2, ranks
            return ranks
        time.sleep(0.05)
    raise AssertionError("training did not start in time")


def finish(proc: subprocess.Popen, ranks: list[int], timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    deadline = time.time() + 10
    while any(alive(p) for p in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in ranks if alive(p)], f"orphaned ranks: {ranks}"
    return proc.returncode, out, err


def assert_clean_stop(code: int, out: str, err: str, run_dir: Path) -> None:
    assert code == PREEMPTED, f"exit {code}\n{out[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-4000:]
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s" not in ln and "train:" not in ln]
    assert len(lines) <= 6, "a stop should say a few clear lines:\n" + "\n".join(lines)
    found = ckpt.find_resume("auto", run_dir / "checkpoints")
    assert found is not None and ckpt.verify_checkpoint(found) == []
    logged = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert found.name == f"step-{logged:07d}", (found, logged)
    assert logged < 400, "the signal must stop the run early"


@pytest.mark.slow
@pytest.mark.parametrize("target,sig", [
    ("launcher", signal.SIGTERM), ("launcher", signal.SIGUSR1), ("launcher", signal.SIGINT),
    ("launcher", signal.SIGHUP), ("group", signal.SIGINT), ("rank", signal.SIGUSR1), ("rank", signal.SIGHUP),
])
def test_stop_signal_checkpoints_and_exits_75(tmp_path, target, sig):
    run = tmp_path / "run"
    proc = start(run)
    ranks = wait_for_steps(proc, run)
    if target == "launcher":
        os.kill(proc.pid, sig)
    elif target == "group":
        os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal does
    else:
        os.kill(ranks[1], sig)
    assert_clean_stop(*finish(proc, ranks), run)


@pytest.mark.slow
def test_preempted_run_resumes_with_resume_auto(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "train.max_steps=30", "checkpoint.every_steps=0")
    ranks = wait_for_steps(proc, run, steps=2)
    os.kill(proc.pid, signal.SIGUSR1)
    code, out, err = finish(proc, ranks)
    assert code == PREEMPTED, err[-3000:]
    train(run, *LONG_JOB, "train.max_steps=30", "resume=auto", "checkpoint.save_final=true")
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert max(steps) == 30 and ckpt.find_resume("auto", run / "checkpoints").name == "step-0000030"


@pytest.mark.slow
def test_a_stop_during_evaluation_checkpoints_within_a_batch(tmp_path):
    """The ranks agree on a stop before every eval batch: 75 and a checkpoint within seconds, not after
    the whole evaluation (7 batches of 2 s each here, made slow by tests/support/hooks/slow_eval)."""
    flag = tmp_path / "slow"
    env = child_env(FFT_DIST_TEST_SLOW_EVAL=str(flag))
    env["PYTHONPATH"] = f"{SUPPORT / 'hooks' / 'slow_eval'}{os.pathsep}{env['PYTHONPATH']}"
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run}", *LONG_JOB,
                             "eval.every_steps=2", "eval.max_batches=0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ranks = wait_for_steps(proc, run, steps=1)
    flag.touch()  # from here on every eval batch is slow; the evaluation at step 2 takes ~14 s
    ranks = wait_for_steps(proc, run, steps=2)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGUSR1)
    code, out, err = finish(proc, ranks)
    took = time.time() - t0
    assert code == PREEMPTED, err[-3000:]
    assert took < 8, f"the stop waited {took:.1f} s: the whole evaluation"
    assert ckpt.find_resume("auto", run / "checkpoints").name == "step-0000002"
    assert not [r for r in read_metrics(run) if "eval_loss" in r and r["step"] == 2], "a cut-short eval is not logged"


def test_signal_before_any_rank_starts_exits_76_and_says_nothing_was_saved(tmp_path):
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


@pytest.mark.slow
@pytest.mark.parametrize("point", ["mid_stage", "after_model_shards", "before_rename"])
def test_kill_9_of_the_launcher_in_each_phase_of_an_async_save_keeps_the_previous_checkpoint(tmp_path, point):
    """kill -9 of the launcher while step 4's asynchronous save is staging (the training thread), writing or
    committing (the writer thread, paused there): the ranks die with it and write nothing more, step 2 still
    verifies, and resume=auto takes it (issue 21)."""
    run = tmp_path / "run"
    env = {**child_env(), "FFT_DIST_FAULT_KILL_AT": point, "FFT_DIST_FAULT_KILL_RANK": "all",
           "FFT_DIST_FAULT_KILL_STEP": "4", "FFT_DIST_FAULT_DELAY_S": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run}", *LONG_JOB,
                             "checkpoint.every_steps=2", "checkpoint.keep_last=1000", "checkpoint.async_save=on"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    reached, lines = threading.Event(), []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if f"fault point {point}:" in line:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(240), "".join(lines)[-3000:]
        ranks = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.time() + 10
        while any(alive(p) for p in ranks) and time.time() < deadline:
            time.sleep(0.05)
        assert not [p for p in ranks if alive(p)], "the ranks outlived their launcher"
    finally:
        kill_job(proc)
    root = run / "checkpoints"
    before, logged = sorted(p.name for p in root.iterdir()), len(read_metrics(run))
    time.sleep(2)
    assert sorted(p.name for p in root.iterdir()) == before, "a rank wrote on without its launcher"
    assert len(read_metrics(run)) == logged, "no rank may go on training unsupervised"
    assert ckpt.verify_checkpoint(root / "step-0000002") == []
    assert not (root / "step-0000004").exists()
    assert ckpt.find_resume("auto", root) == root / "step-0000002"


# -- the run directory ---------------------------------------------------------------------------------
def test_second_run_on_a_busy_run_dir_is_refused_with_the_holder(tmp_path):
    run = tmp_path / "run"
    proc = start(run)
    try:
        wait_for_steps(proc, run)
        second = subprocess.run([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run}", *TINY_JOB],
                                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"pid {proc.pid} on host" in second.stderr and "in use by another fft-dist run" in second.stderr
        # another run.dir but the same checkpoint.dir: the two would delete each other's saves in progress
        third = subprocess.run([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={tmp_path / 'other'}",
                                f"checkpoint.dir={run / 'checkpoints'}", *TINY_JOB, "checkpoint.save_final=true"],
                               cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
        assert third.returncode == 2, third.stdout[-2000:] + third.stderr[-2000:]
        assert f"checkpoint.dir={run / 'checkpoints'} is in use by another fft-dist run" in third.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def test_new_run_never_touches_another_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    job = [*TINY_JOB, "train.max_steps=2", "checkpoint.save_final=true"]
    train(run, *job)
    first = ckpt.find_resume("auto", run / "checkpoints")
    digest = {p.name: p.stat().st_mtime_ns for p in first.rglob("*")}
    proc = train(run, *job, expect_rc=2)
    assert "resume=auto" in proc.stderr and "checkpoint.overwrite=true" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in first.rglob("*")} == digest
    train(run, *job, "checkpoint.overwrite=true")  # explicit opt-in: a fresh run in the same dir
    assert ckpt.find_resume("auto", run / "checkpoints").name == "step-0000002"
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2], "metrics of the old run are gone"


def start_one_rank(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run_dir}", *TINY_JOB, *SINGLE,
                             "train.max_steps=400", *overrides], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_one_rank_trains_in_the_launchers_process_and_a_stop_signal_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = start_one_rank(run)
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


def start_launch(run: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "launch", f"run.dir={run}", *overrides], cwd=REPO,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def assert_same_weights(a: Path, b: Path) -> None:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for name in ra.names():
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            x, y = ra.read_full(name, kind), rb.read_full(name, kind)
            assert torch.equal(x, y), f"{name} ({kind}): max diff {(x - y).abs().max()}"


@pytest.mark.slow
def test_torchrun_restart_after_kill_9_resumes_to_identical_weights(tmp_path):
    job = [*TINY_JOB, "launcher=torchrun", "train.max_steps=12", "checkpoint.every_steps=3",
           "checkpoint.save_final=true", "checkpoint.keep_last=10"]
    launch(tmp_path / "full", *job)
    run = tmp_path / "restarted"
    proc = start_launch(run, *job, "launcher.max_restarts=1")
    try:
        deadline = time.time() + 240
        while ckpt.find_resume("auto", run / "checkpoints") is None:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        ranks = children(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], 9)
        out, err = proc.communicate(timeout=300)
    finally:
        kill_job(proc)
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-5000:]}"
    assert "resumed from" in out + err, "the restarted ranks must resume from the checkpoint"
    assert not [p for p in ranks if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text()]
    final = "step-0000012"
    assert ckpt.verify_checkpoint(run / "checkpoints" / final) == []
    assert_same_weights(run / "checkpoints" / final, tmp_path / "full" / "checkpoints" / final)


@pytest.mark.slow
def test_a_stop_signal_is_not_undone_by_a_torchrun_restart(tmp_path):
    """SIGTERM to the launcher: ranks checkpoint and exit 75; torchrun restarts them, and they stop at once."""
    run = tmp_path / "r"
    proc = start_launch(run, *TINY_JOB, "launcher=torchrun", "launcher.max_restarts=2", "train.max_steps=400")
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or '"loss"' not in (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        kill_job(proc)
    assert proc.returncode == 75, f"{out[-3000:]}\n{err[-5000:]}"
    assert "not restarting: the job was stopped by SIGTERM" in out, out[-3000:]
    found = ckpt.find_resume("auto", run / "checkpoints")
    assert found is not None and ckpt.verify_checkpoint(found) == []
    assert max(r["step"] for r in step_records(run)) < 400


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher_checkpoints_and_exits_75(tmp_path):
    """SIGINT to the terminal's process group: DeepSpeed's runner (own session, deaf to it) does not
    kill the ranks; fft-dist forwards the stop to the ranks, which checkpoint and exit 75."""
    run = tmp_path / "r"
    proc = start_launch(run, *TINY_JOB, "launcher=deepspeed", "parallelism=zero2", "train.max_steps=400")
    runner = None
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or '"loss"' not in (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        runner = children(proc.pid)[0]
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        if runner is not None and proc.poll() is None:
            os.killpg(runner, 9)
        kill_job(proc)
    assert proc.returncode == 75, f"{out[-3000:]}\n{err[-5000:]}"
    found = ckpt.find_resume("auto", run / "checkpoints")
    assert found is not None and ckpt.verify_checkpoint(found) == []
    last = max(r["step"] for r in step_records(run))
    assert last < 400 and found.name == f"step-{last:07d}"
