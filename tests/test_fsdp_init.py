"""FSDP without model.path: rank 0 alone builds the seeded model and broadcasts it, and the other
ranks only allocate their shards. The initial weights stay bit-identical to a single process's."""
from __future__ import annotations

import torch

from helpers import TINY_JOB, train
from fft_dist.checkpoint import CheckpointReader

# lr 1e-30 (0 is refused): an AdamW step changes each weight by ~1e-30, far below its fp32 spacing, so the
# saved weights are the initial ones exactly.
FROZEN_STEP = ["train.max_steps=1", "train.lr=1e-30", "train.warmup_steps=0", "train.lr_schedule=constant",
               "checkpoint.save_final=true"]


def weights(run) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(run / "checkpoints" / "step-0000001")
    return {n: reader.read_full(n) for n in reader.names()}


def test_fsdp_initial_weights_are_bit_identical_to_a_single_process(tmp_path):
    train(tmp_path / "one", *TINY_JOB, *FROZEN_STEP, nproc=1, parallelism="none")
    train(tmp_path / "three", *TINY_JOB, *FROZEN_STEP, "train.global_batch_size=6", "train.micro_batch_size=2",
          nproc=3, parallelism="fsdp")
    one, three = weights(tmp_path / "one"), weights(tmp_path / "three")
    assert one.keys() == three.keys() and len(one) > 5
    different = [n for n in one if not torch.equal(one[n], three[n])]
    assert not different, different
