"""Deterministic global batches: the rows of step s depend only on (seed, s), never on world size.

So resuming needs only the step count (no batches are replayed), and changing the number
of ranks splits the same global batch differently without changing the optimisation problem.
A resume with another global batch size continues from the same *sample* position instead
(:meth:`resume_at`): step -> position is then counted from the resumed step.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from fft_dist.data.examples import IGNORE_INDEX, DataError, Example


class GlobalBatchSampler:
    """One source: each epoch is a fresh shuffle, cut into global batches; a last partial batch is dropped."""

    def __init__(self, num_examples: int, global_batch_size: int, *, seed: int, shuffle: bool = True,
                 lengths=None, group_by_length: int = 0):
        """`group_by_length` N > 0 (with every row's `lengths`): each run of N rows of an epoch's order is
        sorted by length, longest first, so a micro batch holds rows of similar length and pads less.
        N counts rows, not batches, so the epoch order does not depend on the batch size (resume-safe)."""
        if group_by_length and lengths is None:
            raise ValueError("group_by_length needs the rows' lengths")
        self.lengths, self.group_by_length = lengths, group_by_length
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
        self._anchor = (0, 0, 0)  # (step, epoch, sample in epoch) the step count is measured from

    def resume_at(self, step: int, saved: dict) -> None:
        """Continue at `step` from the sample position a checkpoint saved (its `position()` dict).

        With the same batch size this changes nothing; with another one, the next batch starts
        at the first sample the saved run had not consumed, in the same epoch order.
        """
        if "epoch" not in saved:
            return
        sample = saved.get("sample_in_epoch", saved.get("batch_in_epoch", 0) * saved.get("global_batch_size", 0))
        epoch, sample = int(saved["epoch"]), int(sample)
        if sample + self.global_batch_size > self.num_examples:  # too few rows left for one batch
            epoch, sample = epoch + 1, 0
        self._anchor = (step, epoch, sample)

    def total_steps(self, epochs: float) -> int:
        """Steps to reach `epochs` passes (counted from the resume position, in batches of the current size)."""
        step0, epoch0, sample0 = self._anchor
        done = epoch0 * self.steps_per_epoch + sample0 / self.global_batch_size
        return max(1, step0 + max(0, math.ceil(epochs * self.steps_per_epoch - done)))

    def _epoch_and_sample(self, step: int) -> tuple[int, int]:
        step0, epoch0, sample0 = self._anchor
        n = step - step0
        left = (self.num_examples - sample0) // self.global_batch_size  # whole batches left in epoch0
        if n < left:
            return epoch0, sample0 + n * self.global_batch_size
        n -= left
        return epoch0 + 1 + n // self.steps_per_epoch, (n % self.steps_per_epoch) * self.global_batch_size

    def position(self, step: int) -> dict:
        """Where step `step` sits in the data; stored in the checkpoint for the resume and for humans."""
        epoch, sample = self._epoch_and_sample(step)
        return {"epoch": epoch, "batch_in_epoch": sample // self.global_batch_size, "sample_in_epoch": sample,
                "steps_per_epoch": self.steps_per_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_examples": self.num_examples}

    def describe(self, step: int) -> str:
        epoch, sample = self._epoch_and_sample(step)
        return f"epoch {epoch}, sample {sample} of {self.num_examples}"

    def _permutation(self, epoch: int) -> torch.Tensor:
        # A tensor, sliced per batch: as a Python list, 1M rows cost ~40 MB on every rank.
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.num_examples, generator=g)
            else:
                self._perm = torch.arange(self.num_examples)
            if self.group_by_length:
                self._perm = grouped_by_length(self._perm, self.lengths, self.group_by_length)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> list[int]:
        epoch, start = self._epoch_and_sample(step)
        perm = self._permutation(epoch)
        return perm[start : start + self.global_batch_size].tolist()

    def rank_micro_batches(self, step: int, *, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's micro batches for `step`: a contiguous slice of the global batch."""
        return split_for_rank(self.global_batch(step), rank=rank, world_size=world_size,
                              micro_batch_size=micro_batch_size)


def grouped_by_length(order: torch.Tensor, lengths, group: int) -> torch.Tensor:
    """`order` with each run of `group` rows sorted by length, longest first (ties keep their order)."""
    import numpy as np

    order_arr = order.numpy() if isinstance(order, torch.Tensor) else np.asarray(order, dtype=np.int64)
    out = []
    for start in range(0, len(order_arr), group):
        chunk = order_arr[start : start + group]
        out.append(chunk[np.argsort(-np.asarray(lengths)[chunk], kind="stable")])
    return torch.from_numpy(np.concatenate(out)) if out else torch.arange(0)


def split_for_rank(batch: list[int], *, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    per_rank = len(batch) // world_size
    mine = batch[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


class MixtureSampler:
    """Several sources by weight. Sample position p (0, 1, 2, ...) belongs to one source by a fixed
    interleaving, so every run of consecutive samples (every global batch) holds each source's share
    to within one row with two sources, a few with more (about 2 measured with five); each source
    walks its own rows, reshuffled per its own epoch. Rows are numbered
    source after source (`offsets`). The rows of step s depend only on (seed, s): p = s x batch.
    """

    def __init__(self, sizes: list[int], shares: list[float], global_batch_size: int, *, seed: int,
                 shuffle: bool = True, names: list[str] | None = None):
        self.sizes, self.global_batch_size, self.seed, self.shuffle = list(sizes), global_batch_size, seed, shuffle
        self.names = list(names or [str(i) for i in range(len(sizes))])
        fracs = [Fraction(s) for s in shares]
        # level i takes share_i / (share_i + ... + share_last) of what earlier levels left
        self._levels = [f / sum(fracs[i:]) for i, f in enumerate(fracs[:-1])]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.num_examples = sum(self.sizes)
        # an epoch: until the source that runs out first has been seen once
        self.samples_per_epoch = min(math.ceil(n / float(f)) for n, f in zip(self.sizes, fracs))
        self._anchor = (0, 0)  # (step, sample position)
        self._perms: dict[int, tuple[int, torch.Tensor | None]] = {}

    def counts(self, position: int) -> list[int]:
        """Samples each source has given in positions [0, position) (exact integer arithmetic)."""
        out, rest = [], position
        for f in self._levels:
            c = (2 * rest * f.numerator + f.denominator) // (2 * f.denominator)  # round(rest * f), half up
            out.append(c)
            rest -= c
        return out + [rest]

    def resume_at(self, step: int, saved: dict) -> None:
        """Continue at `step` from the sample position a checkpoint saved (any batch size)."""
        if "samples" in saved:
            self._anchor = (step, int(saved["samples"]))

    def samples_at(self, step: int) -> int:
        step0, sample0 = self._anchor
        return sample0 + (step - step0) * self.global_batch_size

    def total_steps(self, epochs: float) -> int:
        step0, sample0 = self._anchor
        return max(1, step0 + max(0, math.ceil((epochs * self.samples_per_epoch - sample0) / self.global_batch_size)))

    def position(self, step: int) -> dict:
        p = self.samples_at(step)
        return {"samples": p, "samples_per_epoch": self.samples_per_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_examples": self.num_examples,
                "sources": {name: {"samples": c, "epoch": c // n, "num_examples": n}
                            for name, c, n in zip(self.names, self.counts(p), self.sizes)}}

    def describe(self, step: int) -> str:
        p = self.samples_at(step)
        return f"sample {p} of the mixture (" + ", ".join(
            f"{name}: {c}" for name, c in zip(self.names, self.counts(p))) + ")"

    def _row(self, source: int, k: int) -> int:
        """The k-th row source `source` gives: its epoch k // n is a fresh shuffle of its rows."""
        n = self.sizes[source]
        epoch = k // n
        if self._perms.get(source, (None,))[0] != epoch:
            perm = None
            if self.shuffle:
                g = torch.Generator().manual_seed(((self.seed * 1_000_003 + source) * 100_003 + epoch) % 2**63)
                perm = torch.randperm(n, generator=g)
            self._perms[source] = (epoch, perm)
        perm = self._perms[source][1]
        return self.offsets[source] + (int(perm[k % n]) if perm is not None else k % n)

    def global_batch(self, step: int) -> list[int]:
        p = self.samples_at(step)
        before = self.counts(p)
        rows = []
        for q in range(p + 1, p + self.global_batch_size + 1):
            after = self.counts(q)
            source = next(i for i, (a, b) in enumerate(zip(before, after)) if b > a)
            rows.append(self._row(source, before[source]))
            before = after
        return rows

    def rank_micro_batches(self, step: int, *, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        return split_for_rank(self.global_batch(step), rank=rank, world_size=world_size,
                              micro_batch_size=micro_batch_size)


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
        labels[i, : len(e.labels)] = torch.tensor(e.labels)  # classification rows: one label, the class id
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e.position_ids)
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    return batch
