"""The run directory: one run at a time, never on top of another run's checkpoints.

Called once per job, before training: by the launcher for ``fft-dist train``, or by rank 0 when
a user's own torchrun / deepspeed launcher starts the ranks.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from fft_dist.config import ConfigError, FFTConfig

LOCK_FILE = ".fft-dist.lock"
_held: list = []  # open lock files; the lock lives as long as this process


class RunDirBusy(ConfigError):
    """Another live process holds the run directory."""


def lock_run_dir(run_dir: Path) -> None:
    """Take an exclusive lock on `run_dir`, recording who holds it; refuse if another run has it.

    flock, so a crashed run never leaves a stale lock: the kernel drops it with the process.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "{}"
        f.close()
        try:
            info = json.loads(holder)
        except json.JSONDecodeError:
            info = {}
        raise RunDirBusy(
            f"run.dir={run_dir} is in use by another fft-dist run (pid {info.get('pid', '?')} on host "
            f"{info.get('host', '?')}, started {info.get('started', '?')}); wait for it, stop it, or pick another run.dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    f.flush()
    _held.append(f)


def _existing_checkpoints(ckpt_root: Path) -> list[str]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p.name for p in ckpt_root.iterdir() if p.name.startswith("step-") or p.name == "latest")


def claim_checkpoint_dir(cfg: FFTConfig) -> None:
    """With resume=none, an earlier run's checkpoints are never silently mixed with or pruned by ours."""
    root = Path(cfg.checkpoint.dir)
    found = _existing_checkpoints(root)
    if not found or cfg.resume != "none":
        return
    if not cfg.checkpoint.overwrite:
        raise ConfigError(
            f"checkpoint.dir={root} already holds checkpoints of another run ({', '.join(found[:4])}"
            f"{', ...' if len(found) > 4 else ''}). Continue that run with resume=auto, start a new one in "
            "another run.dir, or delete them on purpose with checkpoint.overwrite=true"
        )
    for name in found:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def start_metrics_file(cfg: FFTConfig, run_dir: Path) -> None:
    """A fresh run starts a fresh metrics.jsonl; a resumed run appends to it."""
    metrics = run_dir / "metrics.jsonl"
    if cfg.resume == "none" and metrics.exists():
        metrics.unlink()


def prepare_run_dir(cfg: FFTConfig, config_yaml: str) -> Path:
    """Lock run.dir, refuse or clear old checkpoints, then write the one resolved config.yaml."""
    run_dir = Path(cfg.run.dir).resolve()
    lock_run_dir(run_dir)
    claim_checkpoint_dir(cfg)
    start_metrics_file(cfg, run_dir)
    (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    return run_dir
