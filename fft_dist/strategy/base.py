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

from fft_dist.models.head import Head

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


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared once, so the loop asks the declaration and never the backend's name."""

    norm_in_update: bool
    """The global gradient norm is computed inside :meth:`Strategy.apply_update` (DeepSpeed): :meth:`Strategy.grad_norm`
    returns None and the loop passes no norm in."""
    frozen_model: bool = True
    """:meth:`Strategy.host_frozen` can host a second, frozen model sharded like the trainable one."""
    update_in_backward: bool = False
    """The optimizer update can run inside backward, per parameter as its gradient is ready (no backend yet)."""


class FrozenModel(Protocol):
    """A second model the strategy hosts for a loss term (a reference to distil from): no gradients, no
    optimizer, never checkpointed, eval mode, sharded like the trainable model (see :meth:`Strategy.host_frozen`)."""

    module: nn.Module
    """The model as the backend holds it (FSDP2 module, ZeRO-3 engine, plain module): for inspection only."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, head: Head | None = None):
        """The model's output (``.logits``) for a micro batch, under ``torch.no_grad`` and the run's precision;
        with `head`, as :meth:`Strategy.forward`'s (the distillation's reference rows under loss.chunk_size)."""

    def local_numel(self) -> int:
        """Parameter elements this rank holds between forwards (its shards or partitions, plus any parameter
        the backend keeps whole): about total / N under fsdp (N = shard group), zero2 and zero3."""

    def load_fragments(self, source: FragmentSource) -> None:
        """Fill this rank's parameter ranges (kind ``param``) from a checkpoint or a pretrained folder."""


class Strategy(Protocol):
    """One parallelism backend. Implementations: none, fsdp (FSDP2), zero2/zero3 (DeepSpeed).

    Every implementation is constructed as ``Cls(cfg, plan, ctx, defaults)`` and takes batch sizes from ``plan``
    only, and every device-dependent setting (precision, ...) from ``defaults`` (never `auto`).
    """

    name: str
    capabilities: Capabilities
    model: nn.Module
    """The wrapped, trainable model (call through :meth:`forward`)."""

    def setup(
        self, *, build_model: Callable[[], nn.Module], make_optimizer: OptimizerFactory, lr_at: LrSchedule
    ) -> None:
        """Build (or partition-build) the model, shard it, and create the optimizer."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, head: Head | None = None):
        """The model's output for a micro batch (``.logits``, and what else the model computes, e.g. a
        Mixture-of-Experts router's ``.aux_loss``), under the configured precision (position_ids:
        packed rows, see model_inputs). With `head` (the chunked loss, ``loss.chunk_size``) no logits are
        made: ``.loss`` is ``head(last hidden state, output embedding, the family's head rules)``, run inside
        the model's call with the output embedding's weight gathered as this backend gathers it
        (fft_dist.models.head.deferred_head), and ``.logits`` is None."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch loss that is already normalised by the global-batch token count.

        The strategy undoes its backend's own averaging (over ranks, over accumulation steps)
        so that the summed gradient is exactly d(sum of token losses / global tokens).
        """

    def grad_norm(self) -> torch.Tensor | None:
        """The pre-clip global gradient norm of this step's gradients, as a tensor on the device (no host
        sync), computed on every rank; None where the backend computes it inside its own update
        (``capabilities.norm_in_update``: DeepSpeed; the loop then does not call this). The first half of the
        optimizer step: the caller reads it together with its other per-step numbers in one device-to-host
        copy, then calls :meth:`apply_update`."""

    def apply_update(self, step: int, norm: float | None) -> float:
        """The second half: clip to train.max_grad_norm with `norm` (the value :meth:`grad_norm` gave),
        optimizer step at lr_at(step), zero grads; returns the norm. A non-finite norm applies no update
        (the gradients are dropped), except under ZeRO-3, where DeepSpeed applies it before we can see
        the norm (so ``on_nonfinite=skip`` is refused there)."""

    def step(self, step: int) -> float:
        """Both halves at once (:meth:`grad_norm`, then :meth:`apply_update`); returns the norm."""
        norm = None if self.capabilities.norm_in_update else self.grad_norm()
        return self.apply_update(step, None if norm is None else float(norm))

    def host_frozen(self, build_model: Callable[[], nn.Module], dtype: torch.dtype | None = None) -> FrozenModel:
        """Build a second model that is never trained, sharded like this backend (none: a plain copy; fsdp,
        hsdp: FSDP2 on the same mesh; zero2, zero3: a ZeRO-3 inference engine, since ZeRO-2 does not
        partition parameters), with the same initial-weight rules as :meth:`setup` (under ``model.path``
        it is built on meta: fill it with :meth:`FrozenModel.load_fragments`). `dtype`: the dtype its
        parameters are stored and run in (None: as the trainable model's). Its parameters never appear in
        :meth:`fragments`. Collective: every rank calls it, after :meth:`setup`."""

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
