"""A resume with another global batch size continues from the same sample position: no sample is
skipped or replayed, in the same epoch order; the step count continues and, with train.epochs,
the run still ends after the same number of passes."""
from __future__ import annotations

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
