"""Deterministic global batches: the rows of step s depend only on (seed, s), never on world size.

So resuming needs only the step count (no batches are replayed), and changing the number
of ranks splits the same global batch differently without changing the optimisation problem.
"""
from __future__ import annotations

import math

import torch

from fft_dist.data.examples import IGNORE_INDEX, DataError, Example


class GlobalBatchSampler:
    def __init__(self, num_examples: int, global_batch_size: int, *, seed: int, shuffle: bool = True):
        if num_examples < global_batch_size:
            raise DataError(
                f"the training set has {num_examples} rows but one global batch needs {global_batch_size}; "
                "lower train.global_batch_size or add data"
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_examples // global_batch_size  # the last partial batch is dropped
        self._perm_epoch = -1
        self._perm = torch.arange(0)

    def total_steps(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def position(self, step: int) -> dict:
        """Where step `step` sits in the data; stored in the checkpoint for humans and checks."""
        return {"epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_examples": self.num_examples}

    def _permutation(self, epoch: int) -> torch.Tensor:
        # A tensor, sliced per batch: as a Python list, 1M rows cost ~40 MB on every rank.
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.num_examples, generator=g)
            else:
                self._perm = torch.arange(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> list[int]:
        pos = self.position(step)
        perm = self._permutation(pos["epoch"])
        start = pos["batch_in_epoch"] * self.global_batch_size
        return perm[start : start + self.global_batch_size].tolist()

    def rank_micro_batches(self, step: int, *, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's micro batches for `step`: a contiguous slice of the global batch."""
        batch = self.global_batch(step)
        per_rank = len(batch) // world_size
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padded positions get attention 0 and label -100.

    Packed rows also get `position_ids`; their padding counts from 0 again, so it forms a
    sequence of its own that no real token attends to.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = examples[0].position_ids is not None
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e.position_ids)
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    return batch
