"""The vocabulary of the memory formulas that each backend's descriptor carries (pure: no processes).

Why here: the formulas live with their backends (fft_dist/strategy/backends/), and memory.py, which
assembles a row from them, sits above this package; so the types they share sit below both.

Vocabulary: Ψ parameters (T of them trainable), N GPUs, w bytes per working weight (4: fft-dist
keeps fp32 weights under every precision; 2 under DeepSpeed's native fp16 / bf16 modes), k optimizer
bytes per trainable parameter (Adam/AdamW 8, SGD with momentum 4, plain SGD 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fft_dist.config import FFTConfig, Parallelism, Precision
from fft_dist.device_defaults import PLANNING_GPU, DeviceDefaults, decide
from fft_dist.strategy.backend import row_backend


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the model (from a meta-device build)."""

    params: int
    trainable: int
    hidden: int
    layers: int
    intermediate: int
    kv_hidden: int
    heads: int
    vocab: int
    gated_mlp: bool
    largest_layer: int
    """Parameters of the largest decoder layer (one FSDP2 unit)."""
    largest_module: int
    """Parameters held directly by the largest single module (ZeRO-3 gathers module by module)."""
    root_params: int
    """Parameters outside the decoder layers (embeddings, final norm, lm_head): FSDP2's root unit."""
    param_sizes: tuple[int, ...]
    """Element count of every parameter (for ZeRO-3's persistence threshold)."""
    attention: str = "sdpa"
    """The attention kernel the model runs (eager keeps the s x s scores)."""


@dataclass(frozen=True)
class Setup:
    """One row's knobs."""

    parallelism: str
    gpus: int
    micro_batch: int
    seq_len: int
    checkpointing: bool
    eval_micro_batch: int = 0
    """eval.micro_batch_size when the run evaluates (0: no eval set, no eval forward)."""
    shard_size: int = 0
    """HSDP: ranks per shard group (0: the backend has none)."""


@dataclass
class StateBytes:
    """A backend's per-GPU model-state bytes for one row (what its descriptor's memory formula returns)."""

    params: int
    grads: int
    master: int
    optim: int
    detail: dict[str, int] = field(default_factory=dict)
    """Buffers by name (every entry but persistent_params counts as buffers)."""
    cpu: int = 0
    """CPU bytes per GPU (offload)."""


def optimizer_bytes_per_param(cfg: FFTConfig) -> int:
    """The chosen optimizer's state bytes per trainable parameter (its own config says)."""
    return cfg.optimizer.state_bytes_per_param()


def planned(cfg: FFTConfig, backend: str) -> DeviceDefaults:
    """The settings a rank on a GPU with bf16 would decide for `backend` (an estimate row such as
    zero2_offload, or a backend name; every `auto` resolved)."""
    return decide(cfg, PLANNING_GPU, deepspeed_stage=row_backend(backend).deepspeed_stage)


def native_16bit(cfg: FFTConfig, backend: str | None = None) -> bool:
    """DeepSpeed's own 16-bit mode (fp16, or parallelism.bf16_weights): 16-bit working weights and gradients."""
    decided = planned(cfg, backend or Parallelism(cfg.parallelism.name).value)
    return decided.precision == Precision.fp16 or (decided.precision == Precision.bf16 and decided.bf16_weights)
