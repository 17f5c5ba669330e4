"""A frozen model beside the trainable one (a reference for a loss term), for the torch-optimizer backends.

The backend builds and shards it (none: a plain module; fsdp and hsdp: FSDP2 on the trainable model's
mesh, resharded after every forward); this module holds what is the same for all of them: no parameter
requires a gradient, the model stays in eval mode, forward runs under ``torch.no_grad``, and the strategy
never yields its parameters as fragments, so it is never checkpointed and no optimizer ever sees it.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from fft_dist.models.head import Head, deferred_head
from fft_dist.strategy.base import FragmentSource, model_inputs

# (tensor) -> (1-D local view, full shape, flat offset): the strategy's own view of what a rank holds.
LocalRange = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, ...], int]]


def freeze(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """No gradients anywhere, eval mode, and the parameters (not the buffers: RoPE's inv_freq stays fp32)
    in `dtype` when one is given."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        if dtype is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


class TorchFrozenModel:
    """:class:`fft_dist.strategy.base.FrozenModel` for none / fsdp / hsdp (see the module docstring)."""

    def __init__(self, module: nn.Module, *, device: torch.device, local_range: LocalRange,
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 after_forward: Callable[[], None] = lambda: None):
        self.module = module
        self.device = device
        self._local_range = local_range
        self._autocast = autocast
        self._after_forward = after_forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, head: Head | None = None):
        with torch.no_grad(), self._autocast(), deferred_head(self.module, head):
            out = self.module(**model_inputs(input_ids, attention_mask, position_ids, self.device))
        self._after_forward()
        return out

    def local_numel(self) -> int:
        return sum(self._local_range(p)[0].numel() for p in self.module.parameters())

    def load_fragments(self, source: FragmentSource) -> None:
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                local, _, start = self._local_range(p)
                local.copy_(source.read(name, "param", start, start + local.numel()).to(local.dtype))
