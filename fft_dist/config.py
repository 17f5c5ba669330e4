"""Typed configuration: the dataclass schema Hydra composes into, plus cross-field validation.

Components receive these dataclasses (built by :mod:`fft_dist.compose`), never the raw Hydra
config. Validation runs once, in the launcher or rank, before any process group exists.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fft_dist.errors import ConfigError  # noqa: F401 - re-exported: the schema's own error
from fft_dist.plugins import check_names as check_plugin_names
from fft_dist.config_launcher import LauncherConfig, LauncherName  # noqa: F401 - part of the schema
from fft_dist.config_resume import ResumeKind, ResumeRequest  # noqa: F401 - part of the schema
from fft_dist.config_optimizer import (  # noqa: F401 - part of the schema
    OPTIMIZERS, AdamConfig, AdamWConfig, OptimizerConfig, OptimizerImplementation, OptimizerName, SGDConfig,
    typed_optimizer)


PACKAGE_DIR = Path(__file__).resolve().parent
TOKENIZER_BUNDLED = "bundled"
"""model.tokenizer=bundled: fft-dist's own 2048-token tokenizer, asked for on purpose."""
ASSETS_DIR = PACKAGE_DIR / "assets"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    auto = "auto"


class Parallelism(str, Enum):
    """The backend names Hydra accepts: the built-in ones, plus any that :func:`add_parallelism_name` adds
    (fft_dist.strategy.backend.register does, so a backend defined outside the package is typed the same)."""

    none = "none"
    fsdp = "fsdp"
    hsdp = "hsdp"
    zero2 = "zero2"
    zero3 = "zero3"


def add_parallelism_name(name: str) -> Parallelism:
    """Make `name` a member of :class:`Parallelism` (idempotent).

    Why: Hydra types ``parallelism.name`` as this enum, so a stray name is refused while composing, and the
    code reads ``.value`` from it; a backend registered at run time must pass the same gate. Enums cannot
    grow by design, so the member is added to the enum's own tables (what ``aenum.extend_enum`` does).
    """
    if name in Parallelism._value2member_map_:
        return Parallelism(name)
    if not name.isidentifier():
        raise ValueError(f"a backend name must be an identifier, not {name!r}")
    member = str.__new__(Parallelism, name)
    member._name_, member._value_ = name, name
    Parallelism._member_map_[name] = member
    Parallelism._value2member_map_[name] = member
    Parallelism._member_names_.append(name)
    type.__setattr__(Parallelism, name, member)
    return member


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
    """The built-in names; data.format is a string checked by fft_dist.data.formats (plugins add names)."""
    text = "text"
    prompt_completion = "prompt_completion"
    chat = "chat"
    tokenized = "tokenized"
    classification = "classification"


@dataclass
class RunConfig:
    dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    """Run directory shared by every rank: config.yaml, metrics.jsonl, tb/, checkpoints/."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."""
    timeout_s: str = "auto"
    """Collective timeout in seconds; a hung rank fails the job after it. auto: 1800 on GPUs (nccl: a large
    model's first save, a slow shared file system), 600 on CPU; decided on the rank, which prints it."""


@dataclass
class ModelConfig:
    name: str = "tiny_llama"
    """Label for logs; the model/ config group sets it. With model.path it defaults to the folder's name."""
    path: str | None = None
    """Local Hugging Face folder (config.json, safetensors weights). None: build `arch` with random init."""
    arch: dict[str, Any] = field(default_factory=dict)
    """transformers config kwargs including model_type; used when path is None."""
    tokenizer: str | None = None
    """Tokenizer folder, or `bundled` (fft-dist's 2048-token byte-level BPE). None: model.path's own (a
    model.path without tokenizer files is refused), or the bundled one for a random init."""
    add_tokens: list[str] = field(default_factory=list)
    """Tokens to add (as special tokens, never split); the embeddings grow, new rows start at the mean
    of the old ones. The <|...|> markers of data.chat_template that the tokenizer lacks are added too."""
    pad_vocab_to_multiple_of: int = 0
    """Round the embedding rows up to a multiple of this (e.g. 64 for GPU kernels); 0: no rounding."""
    attn_implementation: str = "auto"
    """Attention kernel passed to transformers: auto (sdpa where the family supports it, else eager; the
    banner says which), eager, sdpa, flash_attention_2 ... A kernel the family does not support is refused."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in backward to save memory."""
    freeze: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names to keep frozen (e.g. 'model.embed_tokens.*')."""
    freeze_layers: int = 0
    """Freeze the lowest N decoder layers (and the input embeddings when N > 0)."""


@dataclass
class DataConfig:
    name: str = "stdlib_docstrings"
    path: Any = "${asset:stdlib_docstrings.jsonl}"
    """Training data: a file, a glob, a list of files/globs, or a `save_to_disk` folder. Local only.
    The loader follows the extension: .jsonl/.json, .parquet, .csv, .txt (one row per line), .arrow."""
    eval_path: Any = None
    """Eval data in the same forms as `path`. None: hold out `eval_fraction` of the training rows."""
    eval_fraction: float = 0.05
    """Held-out share of the training rows (fixed seed, independent of train.seed) when eval_path is None."""
    format: str = DataFormat.prompt_completion.value
    """text: loss on every token. prompt_completion: loss on the completion only. chat: `messages`
    rendered with the chat template, loss on assistant turns only. tokenized: `input_ids` (+ optional
    `labels` or `loss_mask`) used as they are. classification: `text_key` -> `label_key`, a new task head.
    Or a format a loss.plugins module registers (fft_dist.data.formats.register_format)."""
    text_key: str = "text"
    label_key: str = "label"
    """classification: the column holding each row's label (a name from `labels`)."""
    labels: list[str] = field(default_factory=list)
    """classification: the label names, class id = position. Empty: the sorted distinct training labels."""
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    """chat: the column holding the list of {role, content} messages."""
    chat_template: str | None = None
    """chat: a Jinja template string, or a path to a .jinja file; replaces the tokenizer's own template."""
    max_length: int = 256
    """Rows are truncated to this many tokens (text with `stride`: split into windows of this size)."""
    stride: int = 0
    """text only: split a longer document into windows starting every `stride` tokens (1..max_length);
    the overlap is context only, never trained twice. 0: truncate instead."""
    packing: bool = False
    """Fill each training row with several examples up to max_length; attention stays within each
    example and position ids restart per example (eval rows stay unpacked)."""
    max_examples: int = 0
    """Use only the first N training rows (0: all). Handy for smoke tests."""
    shuffle: bool = True
    """Reshuffle the training rows every epoch (seeded by train.seed)."""
    group_by_length: int = 0
    """Unpacked, single source: sort each run of N rows of an epoch's shuffle by length, so batches pad less (0: off)."""
    cache_dir: str | None = None
    """Where the tokenised splits are kept (one folder per fingerprint: sources, tokenizer, settings).
    None: run.dir/data_cache. Point several runs at one folder to tokenise once for all of them."""
    num_proc: int = 1
    """Worker processes for tokenising (on the one rank that builds the cache)."""
    inspect_terms: list[str] = field(default_factory=list)
    """`fft-dist data`: show how each of these domain terms splits into tokens."""
    mixture: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Several weighted sources instead of `path`: name -> {path, weight, optional eval_path and other
    data.* settings for that source}. Metrics add eval_<name>_loss per source. See docs/data.md (mixtures)."""

    def __post_init__(self) -> None:  # DataFormat.text and "text" are one name; messages print the plain name
        self.format = self.format.value if isinstance(self.format, Enum) else self.format


@dataclass
class LossConfig:
    """The loss: the data format's cross-entropy (logged as `loss`) plus these named terms."""

    terms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"router_aux": {}})
    """Terms added to the cross-entropy: name -> its options. router_aux: the MoE router's load-balancing
    loss, active when the model's config asks for it (output_router_logits, router_aux_loss_coef). Add one
    with +loss.terms.<name>={...}; drop one with ~loss.terms.<name>."""
    plugins: list[str] = field(default_factory=list)
    """Importable module names (a.b.c, never paths) that register terms with fft_dist.loss.register_term;
    imported on every rank before training (a malformed name is refused when the config is typed)."""

    def __post_init__(self) -> None:  # typed once on the launcher: a path or code never reaches a rank
        check_plugin_names(self.plugins, "loss.plugins")


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


@dataclass
class ParallelismConfig:
    name: Parallelism = Parallelism.fsdp
    reshard_after_forward: bool = True
    """FSDP2 / HSDP: free gathered parameters after forward (ZeRO-3 style) instead of keeping them for backward."""
    shard_size: int = -1
    """HSDP: ranks per shard group (parameters sharded within a group, replicated across groups); it must divide
    the world size. -1 (auto): the ranks of one node (LOCAL_WORLD_SIZE on the rank, launcher.nproc_per_node)."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states (and the step) on CPU."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameters on CPU."""
    overlap_comm: bool | str = "auto"
    """DeepSpeed: overlap gradient reduction with backward. auto: DeepSpeed's default for the stage on a GPU
    (ZeRO-3 on, ZeRO-2 off), off on CPU; decided on the rank."""
    bf16_weights: bool | str = "auto"
    """DeepSpeed with bf16: bf16 working weights and gradients, all-gathers and reduce-scatters in bf16, an
    fp32 master partition and fp32 Adam states (DeepSpeed's own bf16 mode). false: fp32 weights with bf16
    autocast and fp32 reductions, as every backend. auto: true on a GPU under bf16, false on CPU."""
    contiguous_gradients: bool = True
    reduce_bucket_size: int = -1
    """Elements per gradient-reduction bucket. -1 (auto): hidden_size^2 on GPU, 2e6 on CPU."""
    allgather_bucket_size: int = -1
    """ZeRO-2 parameter all-gather bucket (elements). -1 (auto): DeepSpeed's 5e8 on GPU, 2e6 on CPU."""
    prefetch_bucket_size: int = -1
    """ZeRO-3 stage3_prefetch_bucket_size (elements). -1 (auto): 0.9 x hidden_size^2 on GPU, 2e6 on CPU."""
    param_persistence_threshold: int = -1
    """ZeRO-3: parameters with at most this many elements stay unpartitioned. -1 (auto): 10 x hidden_size on GPU, 0 on CPU."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys, merged in; keys we set ourselves must not conflict."""


@dataclass
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end if save_final)."""
    keep_last: int = 2
    """Intact checkpoints of this run kept; older ones of this run are pruned after each commit."""
    keep_best: bool = False
    """Also keep the checkpoint with the best eval loss, whatever keep_last says."""
    save_final: bool = True
    export_final: bool = False
    """Also write a consolidated Hugging Face folder to run.dir/hf at the end (after the ranks are done)."""
    export: ExportChoice = ExportChoice.last
    """Which checkpoint export_final writes: last, or best (needs keep_best and evaluations)."""
    overwrite: bool = False
    """With resume=none, delete what an earlier run left (its fft-dist checkpoints, config.yaml, metrics.jsonl,
    tb/ events, hf/ export) instead of refusing; never anything fft-dist cannot prove it made."""
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
    optimizer: Any = field(default_factory=dict, metadata={"variants": OPTIMIZERS})
    """An OptimizerConfig subclass picked by optimizer.name (Any here so that each option keeps its own
    fields; __post_init__ types it)."""
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str = "none"
    """none | auto (newest complete checkpoint in checkpoint.dir, else fresh) | a checkpoint path."""

    def __post_init__(self) -> None:
        self.optimizer = typed_optimizer(self.optimizer)

    @property
    def resume_request(self) -> ResumeRequest:
        """`resume` typed: code asks ``.kind``, never compares the string (one parse, one rule)."""
        return ResumeRequest.parse(self.resume)



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
