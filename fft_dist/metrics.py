"""Rank-0 metrics: metrics.jsonl, TensorBoard events, an optional W&B run, MFU and peak-memory helpers."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fft_dist.config import ConfigError, FFTConfig, LoggingConfig, WandbConfig

WANDB_MODES = ("offline", "online")

# Dense bf16 peak FLOP/s per device (no sparsity). Unknown devices report MFU as null.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # a CPU MFU would be a made-up figure
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*S for attention scores."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_logging(cfg: FFTConfig) -> None:
    """Refuse tracker settings that cannot work, before any rank starts (a ConfigError, exit 2)."""
    wb = cfg.logging.wandb
    if not wb.enabled:
        return
    if wb.mode not in WANDB_MODES:
        raise ConfigError(f"logging.wandb.mode={wb.mode!r} is not one of {', '.join(WANDB_MODES)} "
                          f"(to turn W&B off, set logging.wandb.enabled=false)")
    if not wb.project:
        raise ConfigError("logging.wandb.project is empty; name the W&B project the run goes to")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb.enabled=true but the wandb package is not installed: "
                          "pip install 'fft-dist[wandb]' (or set logging.wandb.enabled=false)")
    env = {**os.environ, **cfg.launcher.env}  # launcher.env reaches the ranks too
    if wb.mode == "online" and not wandb_key_found(env):
        raise ConfigError("logging.wandb.mode=online needs a W&B API key, and none was found (no WANDB_API_KEY, "
                          f"no WANDB_IDENTITY_TOKEN_FILE, no entry for {_wandb_host(env)} in {_netrc_path()}); run "
                          "`wandb login`, or set WANDB_API_KEY (or +launcher.env.WANDB_API_KEY=...), or use "
                          "logging.wandb.mode=offline and `wandb sync` later")


def _wandb_host(env: dict[str, str]) -> str:
    from urllib.parse import urlsplit

    return urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc


def _netrc_path() -> Path:
    """The netrc file wandb 0.31 reads (wandb/sdk/lib/wbauth/wbnetrc.py): $NETRC, else ~/.netrc,
    else ~/_netrc if only that exists."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if windows.exists() and not unix.exists() else unix


def wandb_key_found(env: dict[str, str]) -> bool:
    """Whether wandb.init(mode='online') will find credentials where wandb 0.31 looks for them (the
    environment `env` of the ranks, then the netrc entry of its host), without importing wandb or
    asking the server."""
    import netrc

    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        entry = netrc.netrc(str(_netrc_path())).authenticators(_wandb_host(env))
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _series_name(key: str) -> str:
    """One naming for every tracker: eval_loss -> eval/loss, loss -> train/loss."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else f"train/{key}"


def _scalars(record: dict) -> dict[str, float]:
    return {_series_name(k): v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _WandbRun:
    """A W&B run holding the resolved config; each metrics record is logged at its step."""

    def __init__(self, wb: WandbConfig, *, run_dir: Path, config_yaml: str):
        import wandb

        wandb_dir = Path(wb.dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=wb.project, name=wb.run_name or run_dir.resolve().name, tags=list(wb.tags), mode=wb.mode,
            dir=str(wandb_dir), config=OmegaConf.to_container(OmegaConf.create(config_yaml)),
            # No stdout/stderr capture: the ranks' output stays as torchrun and tqdm print it.
            settings=wandb.Settings(console="off"),
        )

    def log(self, record: dict) -> None:
        if "step" in record:
            self._run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """Writes one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard and,
    if logging.wandb.enabled, to W&B. Only the writer built with enabled=True (rank 0) writes."""

    def __init__(self, run_dir: Path, *, enabled: bool, logging_cfg: LoggingConfig, config_yaml: str):
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        except ImportError:  # tensorboard is a declared dependency; stay usable without it
            self._tb = None
        if logging_cfg.wandb.enabled:
            self._wandb = _WandbRun(logging_cfg.wandb, run_dir=run_dir, config_yaml=config_yaml)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for name, value in _scalars(record).items():
                self._tb.add_scalar(name, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(record)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
