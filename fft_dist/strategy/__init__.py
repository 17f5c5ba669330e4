"""Parallelism backends behind one protocol.

``check(cfg, plan)`` refuses, before any rank starts, whatever the chosen backend cannot do or
would ignore; ``make_strategy(cfg, plan, ctx, defaults)`` builds it on a rank (and runs the same check again)
with the rank's device decisions (:mod:`fft_dist.device_defaults`: precision, overlap, bf16 weights).
Both are plain lookups by :class:`~fft_dist.config.Parallelism`. The checks are pure (no
torch.distributed, transformers or DeepSpeed import), so the launcher stays light.
"""
from __future__ import annotations

from fft_dist.config import BatchPlan, FFTConfig, Parallelism
from fft_dist.device_defaults import DeviceDefaults, resolve
from fft_dist.dist import DistContext
from fft_dist.strategy.base import Fragment, FragmentSource, Strategy
from fft_dist.strategy.deepspeed_config import check_deepspeed
from fft_dist.strategy.options import check_fsdp, check_single

_CHECKS = {
    Parallelism.none: check_single,
    Parallelism.fsdp: check_fsdp,
    Parallelism.zero2: check_deepspeed,
    Parallelism.zero3: check_deepspeed,
}


def check(cfg: FFTConfig, plan: BatchPlan) -> None:
    """Raise ConfigError, naming the option to change, if the chosen backend cannot run `cfg`."""
    _CHECKS[Parallelism(cfg.parallelism.name)](cfg, plan)


def make_strategy(cfg: FFTConfig, plan: BatchPlan, ctx: DistContext, defaults: DeviceDefaults | None = None) -> Strategy:
    """The backend for `cfg` on this rank; `defaults` None: decide them here for ctx.device (scripts, tests)."""
    defaults = defaults or resolve(cfg, ctx.device)
    # Imported here, not at the top: the launcher imports this package for check() only.
    from fft_dist.strategy.deepspeed import DeepSpeedStrategy  # never imports deepspeed itself
    from fft_dist.strategy.fsdp import FSDPStrategy
    from fft_dist.strategy.single import SingleProcessStrategy

    classes = {
        Parallelism.none: SingleProcessStrategy,
        Parallelism.fsdp: FSDPStrategy,
        Parallelism.zero2: DeepSpeedStrategy,
        Parallelism.zero3: DeepSpeedStrategy,
    }
    return classes[Parallelism(cfg.parallelism.name)](cfg, plan, ctx, defaults)


__all__ = ["Fragment", "FragmentSource", "Strategy", "check", "make_strategy"]
