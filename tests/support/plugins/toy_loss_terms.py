"""A user's own loss term, added from outside the package through fft_dist.loss.register_term.

Run with ``loss.plugins=[toy_loss_terms] +loss.terms.z_loss={weight:1e-4}`` and this folder on
PYTHONPATH. The term is the z-loss (squared log-partition of the logits), summed over the non-pad
input tokens; the loss normalises it by their global count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fft_dist.loss import Contribution, register_term


@dataclass(frozen=True)
class ZLoss:
    weight: float
    name: str = "z_loss"
    unit: str = "inputs"
    needs: frozenset = frozenset({"output", "batch"})
    metric: str = "loss/z_loss"

    def __call__(self, inputs) -> Contribution:
        lse = torch.logsumexp(inputs.output.logits.float(), dim=-1)
        mask = inputs.batch["attention_mask"].to(lse.device, lse.dtype)
        return Contribution((lse.square() * mask).sum())


def make(options, context):
    return ZLoss(weight=float(options.get("weight", 1e-4)))


register_term("z_loss", make)
