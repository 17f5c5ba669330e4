"""Typed configuration: the dataclass schema Hydra composes into, plus cross-field validation.

Components receive these dataclasses (via :func:`to_typed`), never the raw Hydra config.
Validation runs once, in the launcher or worker, before any process group exists.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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
    adafactor = "adafactor"


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


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
    """Label for logs; the model/ config group sets it."""
    path: str | None = None
    """Local Hugging Face folder (config.json, safetensors weights). None: build `arch` with random init."""
    arch: dict[str, Any] = field(default_factory=dict)
    """transformers config kwargs including model_type; used when path is None."""
    tokenizer: str | None = None
    """Tokenizer folder. None: model.path if it holds one, else the bundled byte-level BPE."""
    dtype: str = "float32"
    """Storage dtype of the trainable (master) weights. Keep float32; train.precision sets compute."""
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
    lr_schedule: Schedule = Schedule.cosine
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of max_steps; used when warmup_steps is 0."""
    min_lr_ratio: float = 0.1
    """Final lr / peak lr for the linear and cosine schedules."""
    seed: int = 1234
    precision: Precision = Precision.fp32
    """Compute precision. bf16/fp16 keep fp32 master weights; fp16 adds dynamic loss scaling."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    log_every_steps: int = 1
    deterministic: bool = True
    """torch.use_deterministic_algorithms; required for bit-exact resume."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate at step 0, every N optimizer steps and at the end; 0 means only at the end."""
    patience: int = 0
    """Stop after this many evaluations without a new best eval loss (0: never)."""
    micro_batch_size: int = 8
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
    save_final: bool = True
    export_final: bool = False
    """Also write a consolidated Hugging Face folder to run.dir/hf at the end."""


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


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda fmt: datetime.now().strftime(fmt), use_cache=True)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name))


def _store_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="fft_dist_schema", node=FFTConfig)


def compose(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with CLI overrides; Hydra reports unknown keys and bad types."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _register_resolvers()
    _store_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return cfg


def describe_error(e: BaseException) -> str:
    """Hydra hides the useful part (e.g. "Key 'max_stepz' is not in struct") in the cause chain."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip()
        if text and text not in parts and "$VALUE" not in text:
            parts.append(text)
        e = e.__cause__ or e.__context__
    return "\n  ".join(parts)


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve every interpolation (${now:}, ${asset:}, ${run.dir}) exactly once."""
    _register_resolvers()
    OmegaConf.resolve(cfg)
    return cfg


def to_typed(cfg: DictConfig) -> FFTConfig:
    schema = OmegaConf.structured(FFTConfig)
    merged = OmegaConf.merge(schema, cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_yaml(cfg: FFTConfig | DictConfig) -> str:
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def load_yaml(path: str | os.PathLike) -> FFTConfig:
    """Load a resolved config.yaml written by the launcher (every rank reads the same file)."""
    _register_resolvers()
    return to_typed(OmegaConf.load(path))


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


def validate(cfg: FFTConfig, world_size: int) -> BatchPlan:
    """Cross-field checks that Hydra's type checks cannot express. Raises ConfigError."""
    plan = batch_plan(cfg.train, world_size)
    if cfg.parallelism.name == Parallelism.none and world_size != 1:
        raise ConfigError(
            f"parallelism=none runs a single process, but the world size is {world_size}. "
            "Use launcher.nproc_per_node=1, or pick parallelism=fsdp|zero2|zero3."
        )
    if cfg.train.max_steps < 0:
        raise ConfigError("train.max_steps must be >= 0 (0 means: derive from train.epochs)")
    if cfg.train.max_steps == 0 and cfg.train.epochs <= 0:
        raise ConfigError("set train.max_steps > 0 or train.epochs > 0")
    if cfg.train.warmup_steps < 0 or not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError("train.warmup_steps must be >= 0 and train.warmup_ratio in [0, 1)")
    if cfg.train.max_steps and cfg.train.warmup_steps > cfg.train.max_steps:
        raise ConfigError(
            f"train.warmup_steps={cfg.train.warmup_steps} is longer than training "
            f"(train.max_steps={cfg.train.max_steps}); lower the warmup or train longer."
        )
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {cfg.train.lr}")
    if cfg.train.max_grad_norm < 0:
        raise ConfigError("train.max_grad_norm must be >= 0 (0 disables clipping)")
    if cfg.dist.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"dist.backend={cfg.dist.backend!r}: choose auto, gloo or nccl")
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path={cfg.model.path!r} is not a Hugging Face model folder "
                f"({'missing' if not path.exists() else 'no config.json in'} {path})."
            )
    elif not cfg.model.arch.get("model_type"):
        raise ConfigError("model.arch.model_type is required when model.path is not set")
    for key in ("path", "eval_path"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"data.{key}={value!r} does not exist")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError("data.eval_fraction must be in [0, 1)")
    if cfg.data.max_length < 2:
        raise ConfigError("data.max_length must be >= 2")
    if cfg.model.tokenizer is not None and not Path(cfg.model.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer={cfg.model.tokenizer!r} is not a folder")
    if cfg.parallelism.name in (Parallelism.zero2, Parallelism.zero3):
        _validate_deepspeed(cfg, plan)
    if cfg.resume not in ("none", "auto") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume!r} does not exist")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    if cfg.optimizer.name == OptimizerName.adafactor and (cfg.checkpoint.save_final or cfg.checkpoint.every_steps):
        # Refuse now rather than fail at the first save and lose the run.
        raise ConfigError(
            "optimizer=adafactor keeps factored (row/column) states that the checkpoint format cannot store "
            "yet; use optimizer=adamw, or train without checkpoints: checkpoint.save_final=false "
            "checkpoint.every_steps=0"
        )
    return plan


def _validate_deepspeed(cfg: FFTConfig, plan: BatchPlan) -> None:
    """Catch before launch what DeepSpeed would only reject on every rank after start-up."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"parallelism={cfg.parallelism.name.value} needs DeepSpeed, which is not installed. "
            "Install it after torch with: pip install --no-build-isolation 'fft-dist[deepspeed]'"
        )
    if cfg.parallelism.offload_params and cfg.parallelism.name != Parallelism.zero3:
        raise ConfigError("parallelism.offload_params needs ZeRO-3 (parallelism=zero3_offload)")
    if cfg.train.precision == Precision.fp16:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.precision=fp16 with DeepSpeed needs a CUDA device; use bf16 or fp32 on CPU")
    from fft_dist.strategy.deepspeed import build_deepspeed_config

    build_deepspeed_config(cfg.parallelism, cfg.train, plan)  # raises on overrides that fight our options
