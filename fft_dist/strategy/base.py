"""The seam between the training loop and a parallelism backend.

DeepSpeed owns its optimizer, accumulation and clipping, so the seam sits at
forward / backward / step rather than at "wrap the model". The loop never touches
backend objects; the checkpoint code only sees :class:`Fragment`s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

# (model) -> optimizer over model's trainable parameters, with our param groups.
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
# step index (0-based, the step about to be taken) -> learning rate.
LrSchedule = Callable[[int], float]


@dataclass
class Fragment:
    """A contiguous range of one flattened full tensor that this rank owns.

    FSDP2 row shards, ZeRO-3 flat partitions and ZeRO-2 group partitions all reduce to this,
    which is why one checkpoint format serves every backend.
    """

    name: str
    """Parameter name as in the unwrapped Hugging Face model (e.g. model.layers.0.mlp.up_proj.weight)."""
    kind: str
    """'param' or an optimizer-state key such as 'exp_avg', 'exp_avg_sq', 'momentum_buffer'."""
    full_shape: tuple[int, ...]
    flat_start: int
    """Offset of local[0] in the flattened full tensor."""
    local: torch.Tensor
    """1-D tensor of this rank's elements; writing into it updates the live state."""

    @property
    def flat_stop(self) -> int:
        return self.flat_start + self.local.numel()


class FragmentSource(Protocol):
    """What load_fragments reads from: any flat range of any stored tensor."""

    def read(self, name: str, kind: str, start: int, stop: int) -> torch.Tensor: ...

    def has(self, name: str, kind: str) -> bool: ...


class Strategy(Protocol):
    """One parallelism backend. Implementations: none, fsdp (FSDP2), zero2/zero3 (DeepSpeed).

    Every implementation is constructed as ``Cls(cfg, plan, ctx, defaults)`` and takes batch sizes from ``plan``
    only, and every device-dependent setting (precision, ...) from ``defaults`` (never `auto`).
    """

    name: str
    model: nn.Module
    """The wrapped, trainable model (call through :meth:`forward`)."""

    def setup(
        self, *, build_model: Callable[[], nn.Module], make_optimizer: OptimizerFactory, lr_at: LrSchedule
    ) -> None:
        """Build (or partition-build) the model, shard it, and create the optimizer."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None):
        """The model's output for a micro batch (``.logits``, and what else the model computes, e.g. a
        Mixture-of-Experts router's ``.aux_loss``), under the configured precision (position_ids:
        packed rows, see model_inputs)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch loss that is already normalised by the global-batch token count.

        The strategy undoes its backend's own averaging (over ranks, over accumulation steps)
        so that the summed gradient is exactly d(sum of token losses / global tokens).
        """

    def grad_norm(self) -> torch.Tensor | None:
        """The pre-clip global gradient norm of this step's gradients, as a tensor on the device (no host
        sync), computed on every rank; None where the backend computes it inside its own update
        (DeepSpeed). The first half of the optimizer step: the caller reads it together with its other
        per-step numbers in one device-to-host copy, then calls :meth:`apply_update`."""

    def apply_update(self, step: int, norm: float | None) -> float:
        """The second half: clip to train.max_grad_norm with `norm` (the value :meth:`grad_norm` gave),
        optimizer step at lr_at(step), zero grads; returns the norm. A non-finite norm applies no update
        (the gradients are dropped), except under ZeRO-3, where DeepSpeed applies it before we can see
        the norm (so ``on_nonfinite=skip`` is refused there)."""

    def step(self, step: int) -> float:
        """Both halves at once (:meth:`grad_norm`, then :meth:`apply_update`); returns the norm."""
        norm = self.grad_norm()
        return self.apply_update(step, None if norm is None else float(norm))

    def fragments(self) -> Iterator[Fragment]:
        """Every parameter and optimizer-state range this rank owns (each range owned by one rank)."""

    def load_fragments(self, source: FragmentSource) -> None:
        """Fill this rank's ranges from a checkpoint, whatever world size or backend wrote it."""

    def train(self, mode: bool = True) -> None: ...


def model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                 device: torch.device) -> dict:
    """Keyword arguments for the HF model. Packed rows pass position ids that restart per document
    and no attention mask: transformers then builds a block-causal mask, so no document sees another."""
    if position_ids is None:
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    return {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device), "use_cache": False}
