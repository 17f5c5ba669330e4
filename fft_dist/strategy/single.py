"""parallelism=none: one process, no sharding. The numerical reference for every backend."""
from __future__ import annotations

import contextlib

import torch

from fft_dist.config import BatchPlan, FFTConfig, Precision
from fft_dist.device_defaults import DeviceDefaults
from fft_dist.dist import DistContext
from fft_dist.strategy.frozen import freeze
from fft_dist.strategy.torch_common import TorchOptimizerStrategy


class SingleProcessStrategy(TorchOptimizerStrategy):
    name = "none"

    def __init__(self, cfg: FFTConfig, plan: BatchPlan, ctx: DistContext, defaults: DeviceDefaults):
        del plan  # nothing to check beyond the options it does not read (make_strategy refuses those)
        super().__init__(cfg, ctx, defaults)

    def setup(self, *, build_model, make_optimizer, lr_at) -> None:
        self.model = build_model().to(self.device)
        self._finish_setup(make_optimizer, lr_at)

    def _build_frozen(self, build_model, dtype):
        return freeze(build_model(), dtype).to(self.device)

    def _autocast(self):
        if self.precision == Precision.fp32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)
