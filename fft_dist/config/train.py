"""The train and eval sections: the loop's schedule, precision and batch sizes, and the batch plan
(micro batch x ranks x accumulation) every component reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fft_dist.errors import ConfigError


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    auto = "auto"


class OnNonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps to run. 0: derive from `epochs`."""
    epochs: float = 1.0
    """Passes over the training set, used when max_steps is 0."""
    global_batch_size: int = 16
    """Sequences per optimizer step across all ranks; accumulation = global / (micro * world)."""
    micro_batch_size: int = 4
    """Sequences per forward pass on one rank."""
    lr: float = 1e-3
    """Peak learning rate."""
    lr_schedule: Schedule = Schedule.cosine
    warmup_steps: int = 0
    """Linear warmup steps; 0: use warmup_ratio. Setting both is an error."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps, so any run length works; used when warmup_steps is 0."""
    min_lr_ratio: float = 0.1
    """Final lr / peak lr for the linear and cosine schedules."""
    seed: int = 1234
    precision: Precision = Precision.auto
    """Compute precision. bf16/fp16 keep fp32 master weights; fp16 adds dynamic loss scaling. auto: bf16 on a
    GPU that supports it, else fp32 (decided on the rank; `estimate`/`plan` assume a GPU with bf16)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    """A NaN/inf gradient norm never updates the weights. stop: exit 3 (the last checkpoint stays good).
    skip: drop that step's update, count it in metrics (skipped_steps) and go on."""
    log_every_steps: int = 1
    """Write a metrics record every N optimizer steps."""
    deterministic: bool | str = "auto"
    """true: torch.use_deterministic_algorithms and no TF32, so a resume is bitwise exact. false: the fastest
    kernels (and TF32 matmuls on CUDA). auto: false on CUDA, true on CPU; decided on the rank."""
    compile: bool = False
    """torch.compile each decoder layer's forward (fsdp, none; refused under zero2/zero3). The first
    steps pay the compile time (tens of seconds on CPU)."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate at step 0, every N optimizer steps and at the end; 0 means only at the end."""
    patience: int = 0
    """Stop after this many evaluations without a new best eval loss (0: never)."""
    micro_batch_size: int = 8
    """Sequences per eval forward on one rank."""
    max_batches: int = 0
    """Cap on eval micro-batches per rank (0: the whole eval split)."""
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Held-out sets evaluated but never trained on (a forgetting report): name -> a data.mixture entry without
    the weight ({path, format, ...}); every file row is evaluated at step 0 and at each evaluation, logged as
    eval_<name>_loss, and the end of the run shows its loss before and after. The name must not be a
    data.mixture source."""
    select: dict[str, float] = field(default_factory=dict)
    """Which loss picks the best checkpoint (and drives patience): weights over `task` (eval_loss) and the
    eval.sets names, e.g. {task: 1.0, general: 0.5}. Empty: the task loss alone."""


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int


def batch_plan(train: TrainConfig, world_size: int) -> BatchPlan:
    per_step = train.micro_batch_size * world_size
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if train.global_batch_size % per_step:
        options = sorted({per_step * k for k in (1, 2, 4, 8)})
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) = {per_step}. "
            f"Use a global batch that is a multiple of {per_step} (e.g. {options}) or change the micro batch."
        )
    return BatchPlan(world_size, train.micro_batch_size, train.global_batch_size // per_step, train.global_batch_size)
