"""Which ``parallelism.*`` option each backend reads, and the pre-launch checks of none and fsdp.

Every option either does something under the chosen backend or is refused here, before any
rank starts. "Set" means: different from the dataclass default in
:class:`fft_dist.config.ParallelismConfig` (the shipped yaml groups only repeat those defaults).

Pure: imports only the config module, so the launcher can run it without torch.distributed,
transformers or DeepSpeed.
"""
from __future__ import annotations

from fft_dist.config import BatchPlan, ConfigError, FFTConfig, ParallelismConfig

# Read only by the DeepSpeed strategies (zero2 / zero3).
DEEPSPEED_ONLY = (
    "offload_optimizer", "offload_params", "overlap_comm", "bf16_weights", "contiguous_gradients", "reduce_bucket_size",
    "allgather_bucket_size", "prefetch_bucket_size", "param_persistence_threshold", "deepspeed_overrides",
)
# Read only by ZeRO-3 (offload_params has its own message, see deepspeed_config.check_deepspeed).
ZERO3_ONLY = ("prefetch_bucket_size", "param_persistence_threshold")
# Read only by FSDP2 (fsdp, hsdp).
FSDP_ONLY = ("reshard_after_forward",)
# Read only by HSDP.
HSDP_ONLY = ("shard_size",)

_DEFAULTS = ParallelismConfig()


def _changed(parallelism: ParallelismConfig, fields: tuple[str, ...]) -> list[str]:
    """The `fields` whose value differs from the ParallelismConfig default (true/True/"true" alike)."""
    return [f for f in fields if _norm(getattr(parallelism, f)) != _norm(getattr(_DEFAULTS, f))]


def _norm(value):
    return str(value).lower() if isinstance(value, (bool, str)) else value


def refuse_changed(parallelism: ParallelismConfig, fields: tuple[str, ...], why: str) -> None:
    """ConfigError naming every option in `fields` that is set, with its default to go back to."""
    bad = _changed(parallelism, fields)
    if bad:
        name = getattr(parallelism.name, "value", parallelism.name)
        settings = ", ".join(f"parallelism.{f}={getattr(parallelism, f)!r}" for f in bad)
        defaults = " ".join(f"parallelism.{f}={_yaml(getattr(_DEFAULTS, f))}" for f in bad)
        verb = "has" if len(bad) == 1 else "have"
        raise ConfigError(f"{settings} {verb} no effect under parallelism={name} ({why}). "
                          f"Remove {'it' if len(bad) == 1 else 'them'} (default: {defaults}).")


def _yaml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "{}" if value == {} else str(value)


def check_single(cfg: FFTConfig, plan: BatchPlan) -> None:
    """parallelism=none: no sharding, so every sharding option would be ignored."""
    del plan  # same signature as every check
    refuse_changed(cfg.parallelism, DEEPSPEED_ONLY, "read by DeepSpeed only")
    refuse_changed(cfg.parallelism, FSDP_ONLY, "read by FSDP2 only")
    refuse_changed(cfg.parallelism, HSDP_ONLY, "read by HSDP only; use parallelism=hsdp")


def check_fsdp(cfg: FFTConfig, plan: BatchPlan) -> None:
    """parallelism=fsdp: shards over every rank, so a shard group size would be ignored."""
    check_fsdp_family(cfg)
    del plan
    refuse_changed(cfg.parallelism, HSDP_ONLY, "read by HSDP only; use parallelism=hsdp")


def check_fsdp_family(cfg: FFTConfig) -> None:
    """fsdp and hsdp: FSDP2 has no separate optimizer / parameter offload (refused, see below)."""
    # FSDP2's CPUOffloadPolicy moves parameters, gradients and the optimizer step to the CPU all at
    # once; it maps onto neither flag alone, and on a CPU-only machine it would change nothing that
    # a test could see. Refuse rather than silently ignore; the DeepSpeed groups do offload.
    refuse_changed(cfg.parallelism, ("offload_optimizer", "offload_params"),
                   "FSDP2 CPU offload is not implemented; parallelism=zero2_offload and zero3_offload "
                   "offload with DeepSpeed")
    rest = tuple(f for f in DEEPSPEED_ONLY if f not in ("offload_optimizer", "offload_params"))
    refuse_changed(cfg.parallelism, rest, "read by DeepSpeed only")

