"""data.packing: packed rows give every example exactly the loss it has alone (no attention across
examples, positions restarting per example), and training with packing keeps backend parity."""
from __future__ import annotations

import pytest

from helpers import TINY_JOB, assert_close_rel, train, train_losses
from data_packing_shared import short_rows


@pytest.mark.slow
def test_packing_keeps_backend_parity(tmp_path):
    job = (*TINY_JOB, f"data.path={short_rows(tmp_path / 'd.jsonl', 200)}", "data.packing=true", "train.max_steps=4")
    train(tmp_path / "ref", *job, nproc=1, parallelism="none")
    train(tmp_path / "fsdp", *job, "train.micro_batch_size=1", nproc=2, parallelism="fsdp")
    assert_close_rel(train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "ref"), 1e-5, "fsdp x2 packed")
    train(tmp_path / "zero2", *job, nproc=2, parallelism="zero2")
    assert_close_rel(train_losses(tmp_path / "zero2"), train_losses(tmp_path / "ref"), 1e-5, "zero2 x2 packed")


@pytest.mark.slow
def test_resume_mid_epoch_with_packing_continues_with_the_next_batches(tmp_path):
    """Save at step 3 of a packed run; resuming gives the uninterrupted run's steps 4-6, at 2 ranks and at 1."""
    from helpers import step_records

    job = (*TINY_JOB, f"data.path={short_rows(tmp_path / 'd.jsonl', 200)}", "data.packing=true",
           f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=6", "checkpoint.every_steps=3")
    train(tmp_path / "full", *job)
    full = {r["step"]: r["loss"] for r in step_records(tmp_path / "full")}
    assert len(full) == 6 and full[4] != full[5]
    step3 = tmp_path / "full" / "checkpoints" / "step-0000003"
    proc = train(tmp_path / "same", *job, f"resume={step3}")
    assert "cached in" in proc.stdout, "the second run reuses the tokenised cache"
    same = {r["step"]: r["loss"] for r in step_records(tmp_path / "same")}
    assert [same[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)], "bit-identical at the same world size"
    train(tmp_path / "one", *job, f"resume={step3}", nproc=1, parallelism="none")
    one = {r["step"]: r["loss"] for r in step_records(tmp_path / "one")}
    assert_close_rel([one[s] for s in (4, 5, 6)], [full[s] for s in (4, 5, 6)], 1e-5, "resumed on 1 rank")
