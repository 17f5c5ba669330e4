"""A frozen model beside a ZeRO-2 or ZeRO-3 run: a DeepSpeed ZeRO-3 inference engine.

DeepSpeed's own way to run a model it never trains (its Hugging Face integration's "ZeRO inference", and
the reference models of RLHF libraries): ``deepspeed.initialize`` with a stage-3 config and no optimizer,
which gives an engine whose only ZeRO part is the parameter partitioning (``DeepSpeedZeRoOffload``). It is
built under ``zero.Init`` so no rank ever holds the whole model. ZeRO-3 even beside ZeRO-2, since ZeRO-2
does not partition parameters: the reference costs its parameter bytes / N per rank either way.

Each parameter's partition is ``ds_tensor`` (rank r holds flat elements ``r * partition`` onwards);
parameters under the persistence threshold (norms, biases) also stay whole after the first forward.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from fft_dist.models.head import Head, deferred_head
from fft_dist.strategy.base import FragmentSource, model_inputs
from fft_dist.strategy.deepspeed_compat import ScopedZero3Linear, hf_init_on_gathered_params, keep_arange_dtype
from fft_dist.strategy.frozen import freeze


def build_zero3_frozen(deepspeed, config: dict, build_model: Callable[[], nn.Module], *,
                       device: torch.device, rank: int) -> "ZeroFrozenModel":
    """Collective: build `build_model` under zero.Init with `config` (:func:`zero3_inference_config`), freeze
    it and wrap it in an engine without an optimizer."""
    linear = ScopedZero3Linear()  # zero.Init installs DeepSpeed's F.linear for the whole process
    with keep_arange_dtype(), hf_init_on_gathered_params(deepspeed), \
            deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(config)):
        model = build_model()
    freeze(model, None)  # zero.Init built it in the config's dtype already
    engine, _, _, _ = deepspeed.initialize(model=model, config=copy.deepcopy(config), dist_init_required=False)
    engine.eval()
    # Its F.linear matters only where autograd saves the weight; a no-grad forward needs torch's own.
    linear.capture()
    return ZeroFrozenModel(engine, device=device, rank=rank)


class ZeroFrozenModel:
    """:class:`fft_dist.strategy.base.FrozenModel` for zero2 / zero3 (see the module docstring)."""

    def __init__(self, engine, *, device: torch.device, rank: int):
        self.module = engine
        self.device = device
        self.rank = rank

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, head: Head | None = None):
        with torch.no_grad(), deferred_head(self.module.module, head):
            return self.module(**model_inputs(input_ids, attention_mask, position_ids, self.device))

    def _parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.module.named_parameters())

    def local_numel(self) -> int:
        """The partitions, plus the persistent parameters DeepSpeed keeps whole once gathered."""
        held = 0
        for _, p in self._parameters():
            held += p.ds_tensor.numel()
            if p.data.numel() == p.ds_numel:  # gathered between forwards: a persistent parameter
                held += p.ds_numel
        return held

    def _local_range(self, p: nn.Parameter) -> tuple[torch.Tensor, int]:
        part = int(p.partition_numel())
        start = self.rank * part
        valid = max(0, min(part, int(p.ds_numel) - start))
        return p.ds_tensor.data.view(-1)[:valid], start

    def load_fragments(self, source: FragmentSource) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        params = self._parameters()
        whole = [p for _, p in params if p.ds_status == ZeroParamStatus.AVAILABLE]  # persistent, gathered
        if whole:
            whole[0].partition(whole)  # released (the partitions stay), to be gathered again from the new ones
        with torch.no_grad():
            for name, p in params:
                local, start = self._local_range(p)
                if local.numel():
                    local.copy_(source.read(name, "param", start, start + local.numel()).to(local.dtype))
        if whole:
            whole[0].all_gather(whole)
