"""A resume with another global batch size continues from the same sample position: no sample is
skipped or replayed, in the same epoch order; the step count continues and, with train.epochs,
the run still ends after the same number of passes."""
from __future__ import annotations

import pytest
from helpers import TINY_JOB, step_records, train

from fft_dist.data import GlobalBatchSampler


def test_the_next_batch_starts_at_the_first_unconsumed_sample():
    before = GlobalBatchSampler(100, 8, seed=3)
    saved = before.position(4)  # 4 steps x 8 = 32 samples consumed
    assert saved["sample_in_epoch"] == 32
    after = GlobalBatchSampler(100, 16, seed=3)
    after.resume_at(4, saved)
    assert after.global_batch(4) == before.global_batch(4) + before.global_batch(5)
    assert after.global_batch(5) == before.global_batch(6) + before.global_batch(7)
    assert after.position(6)["sample_in_epoch"] == 64
    # 96 + 16 > 100: the rest of epoch 0 cannot fill a batch (dropped, as at every epoch end); epoch 1 follows
    assert after.global_batch(8) == GlobalBatchSampler(100, 16, seed=3).global_batch(6)
    assert after.position(8)["epoch"] == 1
    smaller = GlobalBatchSampler(100, 4, seed=3)
    smaller.resume_at(4, saved)
    assert smaller.global_batch(4) + smaller.global_batch(5) == before.global_batch(4)


def test_same_batch_size_resume_changes_nothing():
    plain = GlobalBatchSampler(100, 8, seed=3)
    resumed = GlobalBatchSampler(100, 8, seed=3)
    resumed.resume_at(17, plain.position(17))
    assert [resumed.global_batch(s) for s in range(17, 40)] == [plain.global_batch(s) for s in range(17, 40)]
    assert [resumed.position(s) for s in range(17, 40)] == [plain.position(s) for s in range(17, 40)]
    assert resumed.total_steps(2.5) == plain.total_steps(2.5) == 30


def test_older_checkpoints_without_a_sample_field_resume_by_batch():
    before = GlobalBatchSampler(100, 8, seed=3)
    saved = {k: v for k, v in before.position(4).items() if k != "sample_in_epoch"}
    after = GlobalBatchSampler(100, 16, seed=3)
    after.resume_at(4, saved)
    assert after.global_batch(4) == before.global_batch(4) + before.global_batch(5)


def test_epochs_end_at_the_same_sample_after_a_batch_size_change():
    """1 epoch of 100 rows at batch 8 is 12 steps (96 samples). Saved at step 4 (32 samples) and resumed at
    batch 16, the run needs 4 more steps (32 + 64 = 96): 8 in all, not 6 (the new batch size's own count)."""
    after = GlobalBatchSampler(100, 16, seed=3)
    after.resume_at(4, GlobalBatchSampler(100, 8, seed=3).position(4))
    assert after.total_steps(1.0) == 8
    assert after.position(8)["epoch"] == 1


@pytest.mark.slow
def test_resumed_run_at_another_global_batch_trains_the_next_samples(tmp_path):
    """Save at step 4 with global batch 4 (16 samples), resume with global batch 8: step 5 trains samples
    16-23, i.e. the uninterrupted run's steps 5 and 6. The loss-token counts (data only) show it."""
    job = (*TINY_JOB, "checkpoint.every_steps=4", "train.max_steps=8")
    train(tmp_path / "full", *job, nproc=1, parallelism="none")
    full = {r["step"]: r["loss_tokens"] for r in step_records(tmp_path / "full")}
    step4 = tmp_path / "full" / "checkpoints" / "step-0000004"
    proc = train(tmp_path / "big", *job, "train.global_batch_size=8", "train.max_steps=6", f"resume={step4}")
    out = proc.stdout + proc.stderr
    assert "train.global_batch_size changed from 4 to 8" in out
    assert "the data continues at epoch 0, sample 16 of" in out, out[-3000:]
    big = {r["step"]: r["loss_tokens"] for r in step_records(tmp_path / "big")}
    assert sorted(big) == [5, 6], "the step count continues from the checkpoint's"
    assert big[5] == full[5] + full[6] and big[6] == full[7] + full[8]
