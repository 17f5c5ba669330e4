"""The trainer never applies or saves a non-finite update, resumes only what fits, keeps the best
checkpoint when asked, and exports after the process group is gone (real 2-rank fsdp runs)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import TINY_JOB, child_env, read_metrics, train
from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointReader
from fft_dist.exit_codes import CHECKPOINT_ERROR, NONFINITE_LOSS

HUGE_LR = ["train.lr=1e30", "train.lr_schedule=constant", "train.warmup_steps=0", "checkpoint.every_steps=1",
           "checkpoint.keep_last=100"]


def params(checkpoint: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(checkpoint)
    return {n: reader.read_full(n) for n in reader.names()}


def saved(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-") and p.is_dir())


def test_nonfinite_update_stops_the_run_and_no_checkpoint_holds_it(tmp_path):
    run = tmp_path / "run"
    proc = train(run, *TINY_JOB, *HUGE_LR, expect_rc=NONFINITE_LOSS)
    assert "is nan" in proc.stderr or "is inf" in proc.stderr, proc.stderr[-2000:]
    assert saved(run), "the steps before the blow-up were checkpointed"
    for folder in saved(run):
        assert all(torch.isfinite(t).all() for t in params(folder).values()), f"{folder} holds NaN/inf"
    latest = ckpt.find_resume("auto", run / "checkpoints")
    assert ckpt.verify_checkpoint(latest) == []


def test_skip_mode_drops_nonfinite_steps_and_leaves_the_weights_alone(tmp_path):
    run = tmp_path / "run"
    proc = train(run, *TINY_JOB, *HUGE_LR, "train.on_nonfinite=skip")
    steps = [r for r in read_metrics(run) if "loss" in r]
    skipped = steps[-1]["skipped_steps"]
    assert 0 < skipped < 10 and "update skipped" in proc.stdout + proc.stderr
    first_skip = next(r["step"] for r in steps if not math.isfinite(r["grad_norm"] or float("nan")))
    before, after = params(saved(run)[first_skip - 2]), params(saved(run)[-1])
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped step changed the weights"


def test_resume_refuses_another_architecture_with_the_same_shapes(tmp_path):
    run = tmp_path / "run"
    job = [*TINY_JOB, "train.max_steps=2", "checkpoint.save_final=true"]
    train(run, *job, "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=4")
    proc = train(run, *job, "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2",
                 "resume=auto", "train.max_steps=3", expect_rc=CHECKPOINT_ERROR)
    assert "num_key_value_heads: checkpoint 4, this run 2" in proc.stderr, proc.stderr[-2000:]


def test_resume_refuses_to_drop_the_optimizer_state_unless_asked(tmp_path):
    run = tmp_path / "run"
    job = [*TINY_JOB, "train.max_steps=2", "checkpoint.save_final=true"]
    train(run, *job)
    proc = train(run, *job, "optimizer=sgd", "resume=auto", "train.max_steps=3", expect_rc=CHECKPOINT_ERROR)
    assert "the checkpoint holds adamw state" in proc.stderr and "checkpoint.load_optimizer=false" in proc.stderr
    train(run, *job, "optimizer=sgd", "resume=auto", "train.max_steps=3", "checkpoint.load_optimizer=false")
    assert max(r["step"] for r in read_metrics(run) if "loss" in r) == 3


def test_resume_says_when_the_schedule_changes(tmp_path):
    run = tmp_path / "run"
    job = [*TINY_JOB, "checkpoint.save_final=true", "train.warmup_steps=0"]
    train(run, *job, "train.max_steps=4")
    proc = train(run, *job, "train.max_steps=8", "resume=auto")
    assert "the run length (steps) changed from 4 to 8" in proc.stdout + proc.stderr
    events = [r for r in read_metrics(run) if r.get("event") == "resume_changed"]
    assert events and events[0]["step"] == 4
    proc = train(run, *job, "train.max_steps=9", "train.global_batch_size=8", "resume=auto")
    assert "train.global_batch_size changed from 4 to 8" in proc.stdout + proc.stderr


@pytest.fixture
def read_only():
    """mount(folder): an empty read-only tmpfs there (skipped, saying why, where mounting is not allowed)."""
    import subprocess

    mounted: list[Path] = []

    def mount(folder: Path) -> Path:
        folder.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_unwritable_checkpoint_dir_stops_before_training(tmp_path, read_only):
    ro = read_only(tmp_path / "ro")
    run = tmp_path / "run"
    proc = train(run, *TINY_JOB, f"checkpoint.dir={ro}/ckpt", "checkpoint.save_final=true",
                 expect_rc=CHECKPOINT_ERROR)
    assert str(ro) in proc.stderr and "not writable" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # refused by the launcher before any rank started: nothing trained, nothing logged
    assert not (run / "metrics.jsonl").exists() or not [r for r in read_metrics(run) if "loss" in r]


def test_a_read_only_run_dir_and_a_folder_named_latest_are_refused_before_launch(tmp_path, read_only):
    from fft_dist.exit_codes import CONFIG_ERROR

    ro = read_only(tmp_path / "ro")
    proc = train(ro / "run", *TINY_JOB, expect_rc=CONFIG_ERROR)
    assert f"run.dir={ro / 'run'} is not writable" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    run = tmp_path / "run"
    (run / "checkpoints" / "latest").mkdir(parents=True)
    (run / "checkpoints" / "latest" / "mine.txt").write_text("mine")
    proc = train(run, *TINY_JOB, "checkpoint.save_final=true", expect_rc=CHECKPOINT_ERROR)
    assert "latest is a folder" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (run / "checkpoints" / "latest" / "mine.txt").read_text() == "mine"
    assert not (run / "metrics.jsonl").exists(), "refused before any rank started"


def test_keep_best_survives_pruning_and_export_best_writes_it(tmp_path):
    run = tmp_path / "run"
    # With this constant lr the eval loss is best at step 4 and worse after it (checked below).
    train(run, *TINY_JOB, "train.max_steps=8", "eval.every_steps=2", "checkpoint.every_steps=2",
          "checkpoint.keep_last=1", "checkpoint.keep_best=true", "checkpoint.export_final=true",
          "checkpoint.export=best", "train.lr=0.03", "train.lr_schedule=constant", "train.warmup_steps=0")
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r and r["step"] > 0}
    best = min(evals, key=evals.get)
    assert best < 8, f"the test needs the best eval before the end: {evals}"
    names = [p.name for p in saved(run)]
    assert names == sorted({f"step-{best:07d}", "step-0000008"}), names
    from safetensors.torch import load_file

    exported = {}
    for f in (run / "hf").glob("model-*.safetensors"):
        exported.update(load_file(f))
    best_params = params(run / "checkpoints" / f"step-{best:07d}")
    assert all(torch.equal(exported[n], best_params[n]) for n in exported)


def test_export_runs_after_the_process_group_so_no_collective_timeout_applies(tmp_path):
    """dist.timeout_s=3 and an export slowed to 8 s: the job still finishes and exports."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # slows down the real export in every process of the job
        "import time\n"
        "import fft_dist.checkpoint as c\n"
        "_real = c.export_hf\n"
        "def _slow(*args, **kwargs):\n"
        "    time.sleep(8)\n"
        "    open(__import__('os').environ['SLOW_EXPORT_MARK'], 'w').close()\n"
        "    return _real(*args, **kwargs)\n"
        "c.export_hf = _slow\n")
    env = child_env()
    env["PYTHONPATH"] = f"{hook}:{env.get('PYTHONPATH', '')}"
    env["SLOW_EXPORT_MARK"] = str(tmp_path / "slow-export-ran")
    import subprocess
    import sys

    from helpers import REPO

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run}", *TINY_JOB,
                           "train.max_steps=2", "checkpoint.save_final=true", "checkpoint.export_final=true",
                           "dist.timeout_s=3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "slow-export-ran").exists(), "the slowed-down export did not run"
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
