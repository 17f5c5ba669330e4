"""Typed configuration, one module per section: the dataclass schema Hydra composes into.

Components receive these dataclasses (built by :mod:`fft_dist.compose`), never the raw Hydra
config. Validation runs once, in the launcher or rank, before any process group exists.
Every name is importable from here (``from fft_dist.config import TrainConfig``); a section's own
module is where its fields and their docstrings live (``fft-dist train --help`` reads them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fft_dist.errors import ConfigError  # noqa: F401 - re-exported: the schema's own error
from fft_dist.config.checkpoint import AsyncSave, CheckpointConfig, ExportChoice  # noqa: F401
from fft_dist.config.data import DataConfig, DataFormat  # noqa: F401
from fft_dist.config.launcher import LAUNCHERS, LauncherConfig, LauncherName  # noqa: F401
from fft_dist.config.loss import LossConfig  # noqa: F401
from fft_dist.config.model import TOKENIZER_BUNDLED, ModelConfig  # noqa: F401
from fft_dist.config.optimizer import (  # noqa: F401
    OPTIMIZERS, AdamConfig, AdamWConfig, OptimizerConfig, OptimizerImplementation, OptimizerName, SGDConfig)
from fft_dist.config.parallelism import Parallelism, ParallelismConfig, add_parallelism_name  # noqa: F401
from fft_dist.config.paths import ASSETS_DIR, PACKAGE_DIR, conf_dir  # noqa: F401
from fft_dist.config.resume import ResumeKind, ResumeRequest  # noqa: F401
from fft_dist.config.run import DistConfig, LoggingConfig, RunConfig, WandbConfig  # noqa: F401
from fft_dist.config.train import (  # noqa: F401
    BatchPlan, EvalConfig, OnNonFinite, Precision, Schedule, TrainConfig, batch_plan)
from fft_dist.config.variants import Variants, variant_fields  # noqa: F401


@dataclass
class FFTConfig:
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"variants": OPTIMIZERS})
    """The dataclass of the option optimizer.name picks (see fft_dist.config.variants)."""
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig, metadata={"variants": LAUNCHERS})
    """The dataclass of the launcher launcher.name picks."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str = "none"
    """none | auto (newest complete checkpoint in checkpoint.dir, else fresh) | a checkpoint path."""

    def __post_init__(self) -> None:
        # composing typed these already (the option's yaml names its dataclass); Python code may hand the base
        for key, group in variant_fields(type(self)):  # each such section becomes its chosen option's dataclass
            setattr(self, key, group.typed(getattr(self, key)))

    @property
    def resume_request(self) -> ResumeRequest:
        """`resume` typed: code asks ``.kind``, never compares the string (one parse, one rule)."""
        return ResumeRequest.parse(self.resume)
