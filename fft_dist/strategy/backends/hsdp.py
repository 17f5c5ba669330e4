"""parallelism=hsdp: FSDP2 on a 2-D mesh, sharded within groups of parallelism.shard_size ranks and
replicated across the groups (the class: fft_dist.strategy.hsdp).

Why: full sharding all-gathers over every rank of every node on every layer; HSDP keeps those
all-gathers and reduce-scatters inside a group (one node by default, its fast links) and crosses the
nodes once per step, with one all-reduce of each gradient shard. The price is memory: each rank holds
1/shard_size of the states, not 1/world.
"""
from __future__ import annotations

import os

from fft_dist.config import (
    BatchPlan, ConfigError, FFTConfig, OptimizerImplementation, OptimizerName, ParallelismConfig,
)
from fft_dist.strategy.backend import Backend, register
from fft_dist.strategy.backends.fsdp import FSDP2_OFFLOAD, sharded_state
from fft_dist.strategy.sizing import planned

AUTO = -1


def shard_size(par: ParallelismConfig, *, world_size: int, local_world_size: int) -> int:
    """Ranks per shard group: parallelism.shard_size, or (-1) the ranks of one node. ConfigError, naming
    parallelism.shard_size, when it is below 1 or does not divide the world size."""
    size = local_world_size if par.shard_size == AUTO else par.shard_size
    where = f" (auto: the {local_world_size} ranks of one node)" if par.shard_size == AUTO else ""
    if size < 1:
        raise ConfigError(f"parallelism.shard_size={par.shard_size} must be >= 1, or -1 (the ranks of one node)")
    if world_size % size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(f"parallelism.shard_size={size}{where} does not divide the world size {world_size}; "
                          f"use one of {divisors}")
    return size


def local_world_size(cfg: FFTConfig) -> int:
    """The ranks of this node: torchrun's LOCAL_WORLD_SIZE on a rank, launcher.nproc_per_node before launch."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or cfg.launcher.nproc_per_node)


def check_hsdp(cfg: FFTConfig, plan: BatchPlan) -> None:
    """Fused SGD (as fsdp: fft_dist.device_defaults.check), and a shard group that fits."""
    if (OptimizerImplementation(cfg.optimizer.implementation) == OptimizerImplementation.fused
            and not cfg.optimizer.sharded_fused):
        name = OptimizerName(cfg.optimizer.name).value
        raise ConfigError(f"optimizer.implementation=fused with optimizer={name} does not run under parallelism=hsdp "
                          f"(torch has no sharded fused {name}); use optimizer.implementation=foreach or auto")
    shard_size(cfg.parallelism, world_size=plan.world_size, local_world_size=local_world_size(cfg))


def group_size(cfg: FFTConfig, gpus: int) -> int | None:
    """For estimate and plan: the configured group at `gpus` GPUs (auto: launcher.nproc_per_node, at most
    `gpus`), None where it does not divide `gpus`."""
    try:
        return shard_size(cfg.parallelism, world_size=gpus, local_world_size=min(cfg.launcher.nproc_per_node, gpus))
    except ConfigError:
        return None


def memory(shape, cfg, setup):
    """As fsdp with the states sharded over one group of shard_size ranks (the whole world if unset)."""
    return sharded_state(shape, cfg, setup.shard_size or setup.gpus, planned(cfg, setup.parallelism).precision)


BACKEND = register(Backend(
    name="hsdp",
    strategy="fft_dist.strategy.hsdp:HSDPStrategy",
    check=check_hsdp,
    memory=memory,
    # fsdp's traffic inside a group, plus one all-reduce of the gradient shards across groups per step
    comm_volume=lambda grad_accum: 3 * grad_accum + 1,
    options=("reshard_after_forward", "shard_size"),
    notes=FSDP2_OFFLOAD,
    rows=(),  # sized when the config chooses it: its shard groups depend on the nodes
    group_size=group_size,
    overrides=lambda setup: [f"parallelism.shard_size={setup.shard_size}"] if setup.shard_size else [],
))
