"""Optimizers with the usual decay / no-decay parameter groups, and step -> lr schedules.

Each `optimizer=` option has its own config dataclass (fft_dist.config.optimizer), so every option
it has reaches torch here and no other can be set.

The schedule is a pure function of the step, so resuming needs nothing but the step
count, and every backend applies exactly the same lr.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Callable

import torch
from torch import nn

from fft_dist.config import ConfigError, OptimizerConfig, OptimizerImplementation, Schedule, TrainConfig
from fft_dist.models.layers import layer_depths
from fft_dist.validate import warmup_steps_for


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def layer_lr_scales(model: nn.Module, gamma: float) -> dict[str, float]:
    """optimizer.layer_lr_decay: {parameter name: lr factor}. Decoder layer l (0-based) of L gets
    gamma^(L - l), the input embeddings (and a head tied to them) gamma^(L + 1), the head and the
    final norm gamma^0 = 1."""
    n_layers, depths = layer_depths(model)
    return {name: gamma ** (n_layers + 1 - depth) for name, depth in depths.items()}


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Trainable parameters split into weight-decay and no-decay groups (1-D tensors never decay), and,
    with optimizer.layer_lr_decay < 1, by lr factor too: each such group carries its ``lr_scale``,
    which set_lr multiplies the schedule's lr by."""
    scales = layer_lr_scales(model, cfg.layer_lr_decay) if cfg.layer_lr_decay < 1.0 else {}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ds_shape: ZeRO-3 partitioned
        decays = not (len(getattr(p, "ds_shape", p.shape)) < 2 or _matches(name, cfg.no_decay))
        groups.setdefault((scales.get(name, 1.0), decays), []).append(p)
    out = []
    for (scale, decays), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        group = {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0}
        if scales:
            group["lr_scale"] = scale
        out.append(group)
    return out


def optimizer_factory(cfg: OptimizerConfig, lr: float,
                      implementation: OptimizerImplementation = OptimizerImplementation.single_tensor,
                      ) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """A factory so strategies can build the optimizer after they wrap or partition the model.

    `implementation` is the rank's decision (fft_dist.device_defaults), never auto; the default is the
    single-tensor loop every CPU parity test was written against."""
    implementation = OptimizerImplementation(implementation)
    if implementation == OptimizerImplementation.auto:
        raise ValueError("optimizer implementation 'auto' must be decided first (fft_dist.device_defaults)")
    kernel = {"foreach": implementation == OptimizerImplementation.foreach,
              "fused": implementation == OptimizerImplementation.fused}

    def make(model: nn.Module) -> torch.optim.Optimizer:
        groups = param_groups(model, cfg)
        if not groups:
            raise ConfigError("no trainable parameters: model.freeze / model.freeze_layers froze everything")
        return cfg.build(groups, lr=lr, **kernel)

    return make


def lr_schedule(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """lr for 0-based step s: linear warmup to train.lr, then constant / linear / cosine decay."""
    warmup = warmup_steps_for(train, total_steps)
    peak, floor = train.lr, train.lr * train.min_lr_ratio

    def lr_at(step: int) -> float:
        if warmup and step < warmup:
            return peak * (step + 1) / warmup
        if train.lr_schedule == Schedule.constant:
            return peak
        decay_steps = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        if train.lr_schedule == Schedule.linear:
            return peak + (floor - peak) * progress
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr_at


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr on every group, times the group's layer-wise factor (``lr_scale``, if any)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
