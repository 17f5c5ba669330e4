"""The step's loss: the format's main term plus the configured terms, normalised in this one place.

Every micro batch contributes ``sum / N`` for each term, where N counts the term's unit over the
whole global batch (all accumulation steps, all ranks): loss tokens (classification: examples) for
the main term, or the non-pad input tokens. So neither the loss nor its gradient depends on how the
global batch is split over ranks and micro batches. The trainer counts the units of its micro
batches, all-reduces the counts once, and hands them back here; it never branches on a term.
"""
from __future__ import annotations

from typing import Any

import torch

from fft_dist.errors import ConfigError
from fft_dist.loss.chunked import ChunkedHead
from fft_dist.loss.kd import ChunkedHeadWithKD, Distillation, RefChunks, kl_logits_sum
from fft_dist.loss.objectives import Objective
from fft_dist.loss.terms import Contribution, LossInputs, Term

MAIN = "ce"
"""The main term's name among the parts (logged as ``loss``, the name every tool reads)."""


class StepLoss:
    """Counts, normalises and sums the terms of one optimizer step's micro batches.

    ``sums`` (float64, on the device) holds per part what is logged: the main term's raw sum (divided
    on the host by N, as it always was) and each extra term's normalised, unweighted value.
    """

    def __init__(self, objective: Objective, terms: list[Term], model_config: Any, chunk_size: int = 0,
                 kd: Distillation | None = None):
        self.objective, self.terms, self.model_config = objective, list(terms), model_config
        self.kd = kd
        """Distillation (loss.kd.weight > 0): its part comes last, normalised by the main term's count."""
        self.chunk_size = chunk_size if objective.unit == "tokens" else 0
        """loss.chunk_size where the objective is the token cross-entropy (a classification head is small)."""
        self.count_slot = {objective.unit: 0, "inputs": 1}
        """Where each unit's global count sits in the counts tensor."""

    @property
    def names(self) -> list[str]:
        return [MAIN] + [t.name for t in self.terms] + ([self.kd.name] if self.kd else [])

    def local_counts(self, batches: list[dict]) -> list[int]:
        """[the main term's units, the non-pad input tokens] of this rank's micro batches (host data)."""
        return [sum(self.objective.count(b) for b in batches),
                sum(int(b["attention_mask"].sum()) for b in batches)]

    def new_sums(self, device, spare: int = 0) -> torch.Tensor:
        """One float64 slot per part, then `spare` slots for the caller (reduced in the same collective)."""
        return torch.zeros(len(self.names) + spare, dtype=torch.float64, device=device)

    def head(self, batch: dict, reference: RefChunks | None = None):
        """What to pass as ``Strategy.forward(..., head=)`` for `batch`: the chunked head and loss
        (loss.chunk_size), or None (the model's own logits). `reference`: the reference's rows for the
        distillation part (training under loss.kd; evaluation passes none)."""
        if not self.chunk_size:
            return None
        if reference is not None and self.kd is not None:
            return ChunkedHeadWithKD(batch["labels"], self.chunk_size, reference, self.kd.temperature)
        return ChunkedHead(batch["labels"], self.chunk_size)

    def main_sum(self, batch: dict, output) -> torch.Tensor:
        """The main term's sum on `batch`: with loss.chunk_size, what the chunked head put in ``output.loss``
        (the forward was given :meth:`head`; see fft_dist.models.head), else the objective's on the full logits."""
        if self.chunk_size:
            if getattr(output, "loss", None) is None:
                raise RuntimeError("loss.chunk_size is on but the forward was not given StepLoss.head(batch)")
            return output.loss[0] if output.loss.dim() else output.loss  # [ce, kd] under distillation
        return self.objective.loss_sum(output.logits, batch["labels"])

    def micro_batch(self, batch: dict, output, counts: torch.Tensor, sums: torch.Tensor, reference=None
                    ) -> torch.Tensor:
        """The micro batch's share of the step's loss (backward this); its parts are added to ``sums``.
        `output`: the strategy's forward of `batch` with ``head=self.head(batch, reference)``. `reference` (under
        loss.kd): the reference's :class:`RefChunks` (chunked) or its full logits for the same batch."""
        loss = self.main_sum(batch, output)
        total = loss / counts[0].to(loss.device, loss.dtype)
        sums[0] += loss.detach().to(sums.device, torch.float64)
        for i, term in enumerate(self.terms, start=1):
            seen = _WithoutLogits(output, term.name) if self.chunk_size else output
            part = term(LossInputs(batch=batch, output=seen, model_config=self.model_config))
            if part is None:
                continue
            share = _normalised(part, counts[self.count_slot[term.unit]])
            total = total + term.weight * share.to(total.device)
            sums[i] += share.detach().to(sums.device, torch.float64)
        if self.kd is not None:
            if reference is None:
                raise RuntimeError("loss.kd is on but the micro batch came without the reference's output")
            kd = (output.loss[1] if self.chunk_size else
                  kl_logits_sum(output.logits, reference, batch["labels"], self.kd.temperature))
            share = kd / counts[0].to(kd.device, kd.dtype)
            total = total + self.kd.weight * share.to(total.device)
            sums[len(self.names) - 1] += share.detach().to(sums.device, torch.float64)
        return total

    def parts(self, sums: list[float], counts: list[float]) -> dict[str, float]:
        """The step's logged value of each part, from the all-reduced sums and counts (host floats)."""
        extra = self.terms + ([self.kd] if self.kd else [])
        return {MAIN: sums[0] / counts[0], **{t.name: v for t, v in zip(extra, sums[1:])}}

    def metrics(self, parts: dict[str, float]) -> dict[str, float]:
        """The extra terms' entries of a step record (the main term is the record's ``loss``)."""
        return {t.metric: parts[t.name] for t in self.terms + ([self.kd] if self.kd else [])}


class _WithoutLogits:
    """The model's output as a term sees it under loss.chunk_size: everything but the full logits, which do not
    exist; reading them is a config error naming the term (not an error deep inside it)."""

    def __init__(self, output, term: str):
        self._output, self._term = output, term

    def __getattr__(self, name: str):
        if name == "logits":
            raise ConfigError(f"loss.terms.{self._term} reads the model's full logits, which loss.chunk_size does not "
                              "compute; set loss.chunk_size=0 to use this term")
        return getattr(self._output, name)

    def __getitem__(self, key):
        return self.__getattr__(key) if key == "logits" else self._output[key]


def _normalised(part: Contribution, count: torch.Tensor) -> torch.Tensor:
    value = part.value
    if part.mean_over is None:
        return value / count.to(value.device, value.dtype)
    return value * (part.mean_over / count.to(value.device, value.dtype))
