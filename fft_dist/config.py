"""Typed configuration: the dataclass schema Hydra composes into, plus cross-field validation.

Components receive these dataclasses (built by :mod:`fft_dist.compose`), never the raw Hydra
config. Validation runs once, in the launcher or worker, before any process group exists.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


class ConfigError(ValueError):
    """A configuration that cannot run. The message says what to change."""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Parallelism(str, Enum):
    none = "none"
    fsdp = "fsdp"
    zero2 = "zero2"
    zero3 = "zero3"


class OptimizerName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


class OnNonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class ExportChoice(str, Enum):
    last = "last"
    best = "best"


class DataFormat(str, Enum):
    text = "text"
    prompt_completion = "prompt_completion"


@dataclass
class RunConfig:
    dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    """Run directory shared by every rank: config.yaml, metrics.jsonl, tb/, checkpoints/."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."""
    timeout_s: int = 600
    """Collective timeout; a hung rank fails the job after this many seconds."""


@dataclass
class ModelConfig:
    name: str = "tiny_llama"
    """Label for logs; the model/ config group sets it. With model.path it defaults to the folder's name."""
    path: str | None = None
    """Local Hugging Face folder (config.json, safetensors weights). None: build `arch` with random init."""
    arch: dict[str, Any] = field(default_factory=dict)
    """transformers config kwargs including model_type; used when path is None."""
    tokenizer: str | None = None
    """Tokenizer folder. None: model.path if it holds one, else the bundled byte-level BPE."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (sdpa works on CPU and GPU)."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in backward to save memory."""
    freeze: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names to keep frozen (e.g. 'model.embed_tokens.*')."""
    freeze_layers: int = 0
    """Freeze the lowest N decoder layers (and the input embeddings when N > 0)."""


@dataclass
class DataConfig:
    name: str = "stdlib_docstrings"
    path: str = "${asset:stdlib_docstrings.jsonl}"
    """JSONL training file. The default is the bundled docstring->body corpus of Python's stdlib."""
    eval_path: str | None = None
    """Optional JSONL eval file. None: hold out `eval_fraction` of the training rows."""
    eval_fraction: float = 0.05
    format: DataFormat = DataFormat.prompt_completion
    """text: loss on every token. prompt_completion: loss on the completion only."""
    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    max_length: int = 256
    """Rows are truncated to this many tokens."""
    max_examples: int = 0
    """Use only the first N training rows (0: all). Handy for smoke tests."""
    shuffle: bool = True
    """Reshuffle the training rows every epoch (seeded by train.seed)."""


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled (adamw) or L2 (adam, sgd) decay; not applied to biases, norms or embeddings listed below."""
    no_decay: list[str] = field(default_factory=lambda: ["*bias", "*norm*.weight", "*ln_*.weight"])
    """fnmatch patterns of parameters without weight decay."""
    momentum: float = 0.9
    """SGD only."""


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
    precision: Precision = Precision.fp32
    """Compute precision. bf16/fp16 keep fp32 master weights; fp16 adds dynamic loss scaling."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    """A NaN/inf gradient norm never updates the weights. stop: exit 3 (the last checkpoint stays good).
    skip: drop that step's update, count it in metrics (skipped_steps) and go on."""
    log_every_steps: int = 1
    """Write a metrics record every N optimizer steps."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms; required for bit-exact resume."""


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


@dataclass
class ParallelismConfig:
    name: Parallelism = Parallelism.fsdp
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3 style) instead of keeping them for backward."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states (and the step) on CPU."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameters on CPU."""
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 2_000_000
    """Elements per gradient-reduction bucket. ~2e6 for CPU tests; use 5e8 on GPUs."""
    allgather_bucket_size: int = 2_000_000
    prefetch_bucket_size: int = 2_000_000
    """ZeRO-3 stage3_prefetch_bucket_size."""
    param_persistence_threshold: int = 0
    """ZeRO-3: parameters smaller than this stay unpartitioned."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys, merged in; keys we set ourselves must not conflict."""


@dataclass
class LauncherConfig:
    name: str = "local"
    nproc_per_node: int = 2
    """Ranks started by `fft-dist train` when it is not already running under a launcher."""
    master_port: int = 0
    """Rendezvous port for self-launch; 0 picks a free one."""


@dataclass
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end if save_final)."""
    keep_last: int = 2
    """Intact checkpoints kept; older ones are pruned after each commit."""
    keep_best: bool = False
    """Also keep the checkpoint with the best eval loss, whatever keep_last says."""
    save_final: bool = True
    export_final: bool = False
    """Also write a consolidated Hugging Face folder to run.dir/hf at the end (after the ranks are done)."""
    export: ExportChoice = ExportChoice.last
    """Which checkpoint export_final writes: last, or best (needs keep_best and evaluations)."""
    overwrite: bool = False
    """With resume=none, delete the checkpoints an earlier run left in checkpoint.dir instead of refusing."""
    load_optimizer: bool = True
    """On resume, restore the optimizer states. false: weights, step and schedule only (to switch optimizer)."""


@dataclass
class WandbConfig:
    enabled: bool = False
    """Mirror metrics to Weights & Biases from rank 0; needs `pip install 'fft-dist[wandb]'`."""
    project: str = "fft-dist"
    """W&B project the run is filed under."""
    run_name: str | None = None
    """Display name of the W&B run; null: the name of run.dir."""
    tags: list[str] = field(default_factory=list)
    """Tags attached to the W&B run."""
    mode: str = "offline"
    """offline (files only, upload later with `wandb sync`) or online (needs `wandb login`)."""
    dir: str = "${run.dir}"
    """Folder W&B writes into (its files go to a wandb/ folder inside it)."""


@dataclass
class LoggingConfig:
    """Experiment trackers beside metrics.jsonl and TensorBoard (which are always written)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class FFTConfig:
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str = "none"
    """none | auto (newest complete checkpoint in checkpoint.dir, else fresh) | a checkpoint path."""


def conf_dir() -> Path:
    """The conf/ tree: FFT_DIST_CONF_DIR, else the package's own copy.

    In git, fft_dist/conf is a symlink to the top-level conf/ (the menu users read), so wheels
    and sdists carry real files and every install finds them here. A checkout made without
    symlink support leaves a plain file there; then the top-level conf/ is used.
    """
    env = os.environ.get("FFT_DIST_CONF_DIR")
    if env:
        return Path(env).resolve()
    bundled = PACKAGE_DIR / "conf"
    return bundled if bundled.is_dir() else PACKAGE_DIR.parent / "conf"


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


def warmup_steps_for(train: TrainConfig, total_steps: int) -> int:
    """The one rule for warmup: absolute steps or a ratio of the run, never longer than the run."""
    warmup = train.warmup_steps or int(round(train.warmup_ratio * total_steps))
    if warmup > total_steps:
        source = f"train.warmup_steps={train.warmup_steps}" if train.warmup_steps else f"train.warmup_ratio={train.warmup_ratio}"
        raise ConfigError(
            f"{source} gives {warmup} warmup steps, longer than training ({total_steps} steps); "
            "lower the warmup (a ratio such as train.warmup_ratio=0.1 fits any length) or train longer."
        )
    return warmup


def _finite(value: float) -> bool:
    # Values are used as float32 inside torch: 1e39 is finite in Python but inf there.
    return math.isfinite(value) and abs(value) < 3.4e38


def _check_ranges(cfg: FFTConfig) -> None:
    """Numbers that would only fail (or silently misbehave) after the ranks start."""
    t = cfg.train
    checks = [
        (cfg.launcher.nproc_per_node >= 1, "launcher.nproc_per_node must be >= 1 (ranks on this node)"),
        (t.max_steps >= 0, "train.max_steps must be >= 0 (0 means: derive from train.epochs)"),
        (t.max_steps > 0 or (_finite(t.epochs) and t.epochs > 0), "set train.max_steps > 0 or train.epochs > 0"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)"),
        (not (t.warmup_steps and t.warmup_ratio),
         "set train.warmup_steps or train.warmup_ratio, not both (put the other to 0)"),
        (_finite(t.lr) and t.lr > 0, f"train.lr must be a finite number > 0, got {t.lr}"),
        (_finite(t.min_lr_ratio) and 0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (_finite(t.max_grad_norm) and t.max_grad_norm >= 0,
         f"train.max_grad_norm must be a finite number >= 0 (0 disables clipping), got {t.max_grad_norm}"),
        (t.log_every_steps >= 1, "train.log_every_steps must be >= 1"),
        (cfg.eval.micro_batch_size >= 1, "eval.micro_batch_size must be >= 1"),
        (cfg.eval.every_steps >= 0, "eval.every_steps must be >= 0 (0: evaluate only at the end)"),
        (cfg.eval.patience >= 0, "eval.patience must be >= 0"),
        (cfg.eval.max_batches >= 0, "eval.max_batches must be >= 0"),
        (cfg.dist.timeout_s >= 1, "dist.timeout_s must be >= 1 second"),
        (cfg.dist.backend in ("auto", "gloo", "nccl"), f"dist.backend={cfg.dist.backend!r}: choose auto, gloo or nccl"),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0 (0: save only at the end)"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (cfg.data.max_length >= 2, "data.max_length must be >= 2"),
        (cfg.data.max_examples >= 0, "data.max_examples must be >= 0 (0: all rows)"),
        (cfg.model.freeze_layers >= 0, "model.freeze_layers must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for i, beta in enumerate(cfg.optimizer.betas):
        if not (_finite(beta) and 0.0 <= beta < 1.0):
            raise ConfigError(f"optimizer.betas[{i}]={beta} must be in [0, 1)")
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas needs 2 values, got {list(cfg.optimizer.betas)}")
    if not (_finite(cfg.optimizer.eps) and cfg.optimizer.eps > 0):
        raise ConfigError(f"optimizer.eps must be a finite number > 0, got {cfg.optimizer.eps}")
    if not (_finite(cfg.optimizer.weight_decay) and cfg.optimizer.weight_decay >= 0):
        raise ConfigError(f"optimizer.weight_decay must be a finite number >= 0, got {cfg.optimizer.weight_decay}")


def _check_paths(cfg: FFTConfig) -> None:
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not path.is_dir():
            what = "a file" if path.exists() else "missing"
            raise ConfigError(f"model.path={cfg.model.path!r} is not a Hugging Face model folder ({path} is {what})")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.model.path!r} is not a Hugging Face model folder (no config.json in {path})")
    elif not cfg.model.arch.get("model_type"):
        raise ConfigError("model.arch.model_type is required when model.path is not set")
    for key in ("path", "eval_path"):
        value = getattr(cfg.data, key)
        if value is None:
            continue
        path = Path(value)
        if path.is_dir():
            raise ConfigError(f"data.{key}={value!r} is a directory; point it at a JSONL file")
        if not path.is_file():
            raise ConfigError(f"data.{key}={value!r} does not exist")
    if cfg.model.tokenizer is not None and not Path(cfg.model.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer={cfg.model.tokenizer!r} is not a folder")


def validate(cfg: FFTConfig, world_size: int) -> BatchPlan:
    """Cross-field checks that Hydra's type checks cannot express. Raises ConfigError.

    Pure and cheap (no torch, no processes): the launcher runs it before any rank starts. Checks
    that need a package (DeepSpeed) or real I/O (data, checkpoints) live with their owners and are
    called next to this one by :mod:`fft_dist.launch`.
    """
    _check_ranges(cfg)
    plan = batch_plan(cfg.train, world_size)
    if cfg.parallelism.name == Parallelism.none and world_size != 1:
        raise ConfigError(
            f"parallelism=none runs a single process, but the world size is {world_size}. "
            "Use launcher.nproc_per_node=1, or pick parallelism=fsdp|zero2|zero3."
        )
    if cfg.train.max_steps:
        warmup_steps_for(cfg.train, cfg.train.max_steps)
    _check_paths(cfg)
    if cfg.checkpoint.export == ExportChoice.best and not cfg.checkpoint.keep_best:
        raise ConfigError("checkpoint.export=best needs checkpoint.keep_best=true (else the best one may be pruned)")
    if cfg.checkpoint.export == ExportChoice.best and not cfg.checkpoint.export_final:
        raise ConfigError("checkpoint.export=best only matters with checkpoint.export_final=true")
    if cfg.checkpoint.keep_best and not cfg.checkpoint.every_steps:
        raise ConfigError("checkpoint.keep_best=true needs checkpoint.every_steps > 0 (else only the final one is saved)")
    if cfg.checkpoint.keep_best and not cfg.eval.every_steps:
        raise ConfigError("checkpoint.keep_best=true needs eval.every_steps > 0 (the best is chosen by eval loss)")
    return plan
