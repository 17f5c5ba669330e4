"""Parallelism backends behind one protocol, each described once (:mod:`fft_dist.strategy.backend`).

``check(cfg, plan)`` refuses, before any rank starts, whatever the chosen backend cannot do or
would ignore: the ``parallelism.*`` options it does not read (one check for every backend, from the
descriptors), then its own rules. ``make_strategy(cfg, plan, ctx, defaults)`` builds it on a rank (refusing
those options again; the strategy runs its own rules again) with the rank's device decisions
(:mod:`fft_dist.device_defaults`: precision, overlap, bf16 weights).
Both look the backend up in the registry; importing this package registers the built-in ones. The checks
are pure (no torch.distributed, transformers or DeepSpeed import), so the launcher stays light.
"""
from __future__ import annotations

from fft_dist.config import BatchPlan, FFTConfig
from fft_dist import device_defaults as _device_defaults
from fft_dist.device_defaults import DeviceDefaults
from fft_dist.dist import DistContext
from fft_dist.strategy import backends as _builtins  # noqa: F401 - registers none, fsdp, hsdp, zero2, zero3
from fft_dist.strategy.backend import Backend, Row, check_options, get, register
from fft_dist.strategy.backend import check as _check
from fft_dist.strategy.base import Fragment, FragmentSource, Strategy


def check(cfg: FFTConfig, plan: BatchPlan) -> None:
    """Raise ConfigError, naming the option to change, if the chosen backend cannot run `cfg`."""
    _check(cfg, plan)


def device_defaults(cfg: FFTConfig, device) -> DeviceDefaults:
    """Every `auto` decided and applied for this rank's `device` (a torch.device), for cfg's backend: its
    descriptor gives the DeepSpeed stage (fft_dist.device_defaults sits below this registry)."""
    return _device_defaults.resolve(cfg, device, deepspeed_stage=get(cfg.parallelism.name).deepspeed_stage)


def make_strategy(cfg: FFTConfig, plan: BatchPlan, ctx: DistContext, defaults: DeviceDefaults | None = None) -> Strategy:
    """The backend for `cfg` on this rank; `defaults` None: decide them here for ctx.device (scripts, tests)."""
    check_options(cfg.parallelism)  # here, not in each class: a new backend cannot forget it
    defaults = defaults or device_defaults(cfg, ctx.device)
    # The class is imported here, not at the top: the launcher imports this package for check() only.
    return get(cfg.parallelism.name).strategy_class()(cfg, plan, ctx, defaults)


__all__ = ["Backend", "Fragment", "FragmentSource", "Row", "Strategy", "check", "device_defaults", "get", "make_strategy",
           "register"]
