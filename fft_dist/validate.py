"""Cross-field validation of the typed config: everything cheap that would otherwise fail after launch.

Pure (no torch, no processes, no heavy imports), so the launcher runs it before any rank starts.
Checks that need a package (DeepSpeed) or real I/O (data, checkpoints) live with their owners and
are called next to this one by :mod:`fft_dist.launch`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from fft_dist import device_defaults
from fft_dist.config import (
    TOKENIZER_BUNDLED,
    BatchPlan,
    ConfigError,
    ExportChoice,
    FFTConfig,
    Parallelism,
    TrainConfig,
    batch_plan,
)


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
        (cfg.dist.timeout_s == "auto" or (cfg.dist.timeout_s.isdigit() and int(cfg.dist.timeout_s) >= 1),
         f"dist.timeout_s must be >= 1 second, or auto (1800 on GPUs, 600 on CPU); got {cfg.dist.timeout_s!r}"),
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
    cfg.optimizer.check()  # each optimizer's own options (fft_dist.config.optimizer)


def _check_eval_sets(cfg: FFTConfig) -> None:
    """eval.sets / eval.select: names and weights (the entries' data settings are checked where they load)."""
    if cfg.eval.sets and not cfg.data.mixture and cfg.data.eval_path is None and not cfg.data.eval_fraction:
        raise ConfigError(f"eval.sets.{next(iter(cfg.eval.sets))}: held-out sets are evaluated beside the task's eval "
                          "split, and data.eval_fraction=0 with no data.eval_path leaves none; give it one")
    for name, entry in cfg.eval.sets.items():
        where = f"eval.sets.{name}"
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", str(name)) or name in ("task", "best"):
            raise ConfigError(f"{where}: a set name must be letters, digits, '_' or '-' (it becomes the metric "
                              "eval_<name>_loss) and not 'task' or 'best'")
        if name in (cfg.data.mixture or {}):
            raise ConfigError(f"{where}: data.mixture.{name} trains on a source of that name; a held-out set is never "
                              "trained on, so give it another name")
        if not hasattr(entry, "get") or entry.get("path") is None:
            raise ConfigError(f"{where} has no path (e.g. +{where}.path=/data/web.jsonl +{where}.format=text)")
        if "weight" in entry:
            raise ConfigError(f"{where}.weight: a held-out set is never trained on, so it has no weight; drop it "
                              "(eval.select weighs it in the choice of the best checkpoint)")
    for key, weight in cfg.eval.select.items():
        if key != "task" and key not in cfg.eval.sets:
            raise ConfigError(f"eval.select.{key}: not 'task' or an eval.sets name (known: "
                              f"{', '.join(['task', *cfg.eval.sets])})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not _finite(weight) or weight < 0:
            raise ConfigError(f"eval.select.{key}={weight!r} must be a finite number >= 0")
    if cfg.eval.select and not sum(cfg.eval.select.values()) > 0:
        raise ConfigError("eval.select: the weights add up to 0; give at least one a weight > 0")


def _check_l2sp(cfg: FFTConfig) -> None:
    """loss.l2sp under hsdp: the pull is applied on each rank's own parameter ranges, and hsdp's replica groups
    after the first own none (the ranks also refuse it, fft_dist/reference.py; this says so before launch)."""
    if cfg.loss.l2sp.weight and cfg.parallelism.name == Parallelism.hsdp:
        raise ConfigError(f"loss.l2sp.weight={cfg.loss.l2sp.weight}: parallelism=hsdp replicates the shards over "
                          "replica groups whose ranks own no parameter ranges, so the pull toward the starting "
                          "weights would not reach their copies; use parallelism=fsdp (or zero2/zero3) or set "
                          "loss.l2sp.weight=0")


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
    # data.path / data.eval_path (files, globs, lists, dataset folders) are checked by data.check_data_files
    if cfg.model.tokenizer not in (None, TOKENIZER_BUNDLED) and not Path(cfg.model.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer={cfg.model.tokenizer!r} is not a folder (or {TOKENIZER_BUNDLED})")
    if cfg.model.pad_vocab_to_multiple_of < 0:
        raise ConfigError(f"model.pad_vocab_to_multiple_of={cfg.model.pad_vocab_to_multiple_of} must be >= 0 "
                          "(0: no rounding)")


def validate(cfg: FFTConfig, world_size: int) -> BatchPlan:
    """Cross-field checks that Hydra's type checks cannot express. Raises ConfigError.

    Pure and cheap (no torch, no processes): the launcher runs it before any rank starts. Checks
    that need a package (DeepSpeed) or real I/O (data, checkpoints) live with their owners and are
    called next to this one by :mod:`fft_dist.launch`.
    """
    _check_ranges(cfg)
    device_defaults.check(cfg)  # true / false / auto, and no explicit choices that contradict
    plan = batch_plan(cfg.train, world_size)
    if cfg.parallelism.name == Parallelism.none and world_size != 1:
        raise ConfigError(
            f"parallelism=none runs a single process, but the world size is {world_size}. "
            f"Use launcher.nproc_per_node=1, or pick parallelism={'|'.join(p.value for p in Parallelism if p != Parallelism.none)}."
        )
    if cfg.train.max_steps:
        warmup_steps_for(cfg.train, cfg.train.max_steps)
    _check_paths(cfg)
    _check_eval_sets(cfg)
    _check_l2sp(cfg)
    if cfg.checkpoint.export == ExportChoice.best and not cfg.checkpoint.keep_best:
        raise ConfigError("checkpoint.export=best needs checkpoint.keep_best=true (else the best one may be pruned)")
    if cfg.checkpoint.export == ExportChoice.best and not cfg.checkpoint.export_final:
        raise ConfigError("checkpoint.export=best only matters with checkpoint.export_final=true")
    if cfg.checkpoint.keep_best and not cfg.checkpoint.every_steps:
        raise ConfigError("checkpoint.keep_best=true needs checkpoint.every_steps > 0 (else only the final one is saved)")
    if cfg.checkpoint.keep_best and not cfg.eval.every_steps:
        raise ConfigError("checkpoint.keep_best=true needs eval.every_steps > 0 (the best is chosen by eval loss)")
    return plan
