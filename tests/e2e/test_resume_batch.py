"""A resume with another global batch size continues from the same sample position: no sample is
skipped or replayed, in the same epoch order; the step count continues and, with train.epochs,
the run still ends after the same number of passes."""
from __future__ import annotations

import pytest

from helpers import TINY_JOB, step_records, train


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
