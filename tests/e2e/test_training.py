"""Real multi-process training runs (gloo, fp32, tiny Llama): parity, accumulation, full fine-tuning, NaN."""
from __future__ import annotations

import pytest

from helpers import TINY_JOB, assert_close_rel, eval_losses, read_metrics, train, train_losses


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """parallelism=none, 1 process, micro batch 4 x accumulation 1 (global batch 4)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(run, *TINY_JOB, "train.micro_batch_size=4", nproc=1, parallelism="none")
    assert [s for s, _ in eval_losses(run)] == [10], "eval.every_steps=0 evaluates only at the end"
    return run


@pytest.fixture(scope="module")
def reference(reference_run):
    return train_losses(reference_run)


def test_cpu_auto_defaults_are_the_reference_settings(reference_run):
    """Every `auto` on CPU is what these parity tests were written against (issue 17), recorded once."""
    (record,) = [r for r in read_metrics(reference_run) if r.get("event") == "defaults"]
    assert record == {"event": "defaults", "device": "cpu", "precision": "fp32", "deterministic": True,
                      "tf32": False, "optimizer_implementation": "single_tensor",
                      "auto": ["train.precision", "train.deterministic", "optimizer.implementation"]}


def test_reference_learns(reference):
    assert len(reference) == 10
    assert reference[-1] < reference[0] - 0.2, reference


@pytest.mark.parametrize("label,nproc,parallelism,micro", [
    ("none: micro 2 x accum 2", 1, "none", 2),
    ("fsdp: 2 ranks x micro 2 x accum 1", 2, "fsdp", 2),
    ("fsdp: 2 ranks x micro 1 x accum 2", 2, "fsdp", 1),
])
def test_same_losses_for_every_split_of_the_global_batch(reference, tmp_path, label, nproc, parallelism, micro):
    """Rows have unequal lengths, so a per-micro-batch mean would fail this; we normalise by global tokens."""
    train(tmp_path / "run", *TINY_JOB, f"train.micro_batch_size={micro}", nproc=nproc, parallelism=parallelism)
    assert_close_rel(train_losses(tmp_path / "run"), reference, 1e-5, label)


def test_nan_loss_stops_with_clear_message(tmp_path):
    proc = train(tmp_path / "run", *TINY_JOB, "train.lr=1e30", "train.max_grad_norm=0", "train.warmup_steps=0",
                 "train.lr_schedule=constant", expect_rc=3)
    assert " is nan at step" in proc.stderr or " is inf at step" in proc.stderr, proc.stderr[-2000:]
    assert "Lower train.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_and_tensorboard_written(tmp_path):
    run = tmp_path / "run"
    proc = train(run, *TINY_JOB, "train.max_steps=4", "eval.every_steps=2")
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb"):
        assert key in steps[0], key
    assert steps[0]["mfu"] is None, "MFU on CPU must be null, not a made-up figure"
    assert [s for s, _ in eval_losses(run)] == [0, 2, 4]
    assert list((run / "tb").glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert (run / "config.yaml").is_file()
    assert "completed after 4 steps" in proc.stdout
    assert proc.stdout.count("completed after") == 1, "the summary must come from rank 0 only"


def test_early_stopping_tracks_best_step(tmp_path):
    run = tmp_path / "run"
    # A huge constant lr makes eval loss get worse after the first evaluations.
    train(run, *TINY_JOB, "train.max_steps=30", "eval.every_steps=2", "eval.patience=2", "train.lr=0.5",
          "train.lr_schedule=constant", "train.warmup_steps=0")
    evals = eval_losses(run)
    last_step = max(r["step"] for r in read_metrics(run) if "loss" in r)
    assert last_step < 30, "patience should have stopped training early"
    best = min(evals, key=lambda e: e[1])
    final = [r for r in read_metrics(run) if "eval_best_step" in r][-1]
    assert final["eval_best_step"] == best[0]


def test_default_job_eval_loss_falls(tmp_path):
    """The embedded default (tiny_llama, stdlib corpus, fsdp x 2), shortened to 30 steps."""
    run = tmp_path / "run"
    train(run, "train.max_steps=30", "eval.every_steps=30", "eval.max_batches=4", "checkpoint.save_final=false",
          "train.warmup_steps=5")
    evals = eval_losses(run)
    assert [s for s, _ in evals] == [0, 30]
    assert evals[1][1] < evals[0][1] - 1.0, evals


def test_runs_under_torchrun_as_worker(tmp_path):
    """`torchrun --nproc_per_node 2 -m fft_dist.train [overrides]`: rank 0's resolved config wins."""
    import subprocess
    import sys

    from helpers import REPO, child_env

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "fft_dist.train", f"run.dir={run}", *TINY_JOB, "train.max_steps=3"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    assert "max_steps: 3" in (run / "config.yaml").read_text()


def test_activation_checkpointing_keeps_the_numbers(reference, tmp_path):
    train(tmp_path / "run", *TINY_JOB, "model.activation_checkpointing=true")
    assert_close_rel(train_losses(tmp_path / "run"), reference, 1e-5, "fsdp + activation checkpointing")


@pytest.mark.parametrize("precision,nproc,parallelism", [("bf16", 2, "fsdp"), ("fp16", 2, "fsdp"), ("bf16", 1, "none")])
def test_mixed_precision_tracks_fp32(reference, tmp_path, precision, nproc, parallelism):
    """Low-precision compute with fp32 master weights follows the fp32 curve loosely (bf16 has 8 mantissa bits)."""
    train(tmp_path / "run", *TINY_JOB, f"train.precision={precision}", nproc=nproc, parallelism=parallelism)
    losses = train_losses(tmp_path / "run")
    assert_close_rel(losses, reference, 0.03, f"{parallelism} {precision} vs fp32")
    assert losses[-1] < losses[0]
