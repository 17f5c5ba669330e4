"""FSDP and ZeRO-2 without model.path: rank 0 alone builds the seeded model and broadcasts it; the other
ranks build on meta and allocate only their shards (FSDP) or their device copy (ZeRO-2). The initial
weights stay bit-identical to a single process's. (ZeRO-2's host memory: tests/e2e/test_device_defaults.py.)"""
from __future__ import annotations

import importlib.util

import pytest
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


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("one")
    train(run, *TINY_JOB, *FROZEN_STEP, nproc=1, parallelism="none")
    return weights(run)


def test_fsdp_initial_weights_are_bit_identical_to_a_single_process(single, tmp_path):
    train(tmp_path / "three", *TINY_JOB, *FROZEN_STEP, "train.global_batch_size=6", "train.micro_batch_size=2",
          nproc=3, parallelism="fsdp")
    three = weights(tmp_path / "three")
    assert single.keys() == three.keys() and len(single) > 5
    different = [n for n in single if not torch.equal(single[n], three[n])]
    assert not different, different


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_zero2_initial_weights_are_bit_identical_to_a_single_process(single, tmp_path):
    train(tmp_path / "two", *TINY_JOB, *FROZEN_STEP, nproc=2, parallelism="zero2")
    two = weights(tmp_path / "two")
    assert single.keys() == two.keys()
    different = [n for n in single if not torch.equal(single[n], two[n])]
    assert not different, different
