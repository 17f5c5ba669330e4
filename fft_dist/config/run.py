"""Where a run lives and how it talks: run.dir, the process group, and logging (stdout, TensorBoard, W&B)."""
from __future__ import annotations

from dataclasses import dataclass, field


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
