"""The checkpoint section: where and how often a run saves, what it keeps and exports."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class AsyncSave(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class ExportChoice(str, Enum):
    last = "last"
    best = "best"


@dataclass
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end if save_final)."""
    async_save: AsyncSave = AsyncSave.auto
    """Write checkpoints in a background thread while training goes on: each save copies the rank's share of
    weights + optimizer states into a host staging buffer (that much more host memory per rank), then trains on.
    auto: on when every rank's buffer fits in half the host memory available; off: saves block training."""
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
