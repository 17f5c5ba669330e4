"""Parallelism backends behind one protocol; `make_strategy` picks one from the config."""
from __future__ import annotations

from fft_dist.config import Parallelism, BatchPlan, FFTConfig
from fft_dist.dist import DistContext
from fft_dist.strategy.base import Fragment, FragmentSource, Strategy


def make_strategy(cfg: FFTConfig, plan: BatchPlan, ctx: DistContext) -> Strategy:
    name = cfg.parallelism.name
    if name == Parallelism.none:
        from fft_dist.strategy.single import SingleProcessStrategy

        return SingleProcessStrategy(train=cfg.train, device=ctx.device)
    if name == Parallelism.fsdp:
        from fft_dist.strategy.fsdp import FSDPStrategy

        return FSDPStrategy(parallelism=cfg.parallelism, train=cfg.train, device=ctx.device, world_size=ctx.world_size,
                            meta_init=cfg.model.path is not None)
    from fft_dist.strategy.deepspeed import DeepSpeedStrategy  # lazy: FSDP users never import deepspeed

    return DeepSpeedStrategy(parallelism=cfg.parallelism, train=cfg.train, plan=plan, ctx=ctx)


def check(cfg: FFTConfig, plan: BatchPlan) -> None:
    """Pre-launch checks of the chosen backend (raises ConfigError)."""
    if cfg.parallelism.name in (Parallelism.zero2, Parallelism.zero3):
        from fft_dist.strategy.deepspeed import build_deepspeed_config

        build_deepspeed_config(cfg.parallelism, cfg.train, plan)


__all__ = ["Fragment", "FragmentSource", "Strategy", "check", "make_strategy"]
