"""The main term of each data format: its cross-entropy sum and the units it is normalised by.

Tokens for the causal-LM formats, examples for classification; :mod:`fft_dist.loss.total` divides
the sum by the global count of those units, so the loss does not depend on how the global batch is
split over ranks and micro batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fft_dist.data.encode import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not ignored (fp32).

    The labels are shifted, not the logits: slicing logits[:, :-1] would copy them in forward and
    again in backward (measured 2-4 ms a step on the tiny model).
    """
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), next_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_loss_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def class_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over examples of the cross-entropy of the pooled logits (batch, num_labels), in fp32.

    A classification row carries its class id in ``labels[:, 0]`` (collate pads the rest with -100).
    """
    return F.cross_entropy(logits.float(), labels[:, 0].to(logits.device), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def count_examples(batch: dict) -> int:
    return int((batch["labels"][:, 0] != IGNORE_INDEX).sum())


def count_correct(logits: torch.Tensor, batch: dict) -> int:
    labels = batch["labels"][:, 0].to(logits.device)
    return int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum())


@dataclass(frozen=True)
class Objective:
    """How one format turns (logits, batch) into a loss sum, and counts its normaliser."""

    unit: str
    """What the normaliser counts: 'tokens' or 'examples'."""
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(logits, labels) -> summed loss (not yet normalised)."""
    count: Callable[[dict], int]
    """batch -> loss-bearing units in it."""
    correct: Callable[[torch.Tensor, dict], int] | None = None
    """(logits, batch) -> correct predictions, for objectives that have an accuracy."""

    def eval_metrics(self, loss: float, correct: int, count: int) -> dict[str, float]:
        """The metrics reported beside eval_loss: perplexity for tokens, accuracy for classes."""
        if self.correct is not None:
            return {"eval_accuracy": correct / count if count else float("nan")}
        return {"eval_ppl": math.exp(min(loss, 50.0))}


TOKENS = Objective("tokens", token_loss_sum, count_loss_tokens)
CLASSES = Objective("examples", class_loss_sum, count_examples, count_correct)

