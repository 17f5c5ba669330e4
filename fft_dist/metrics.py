"""Rank-0 metrics: metrics.jsonl, TensorBoard events, an optional W&B run, MFU and peak-memory helpers."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import resource
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from fft_dist.config import ConfigError, FFTConfig, LoggingConfig, WandbConfig
from fft_dist.models.family import dimension, text_config

WANDB_MODES = ("offline", "online")

PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("H100", "NVL"), "H100 NVL", 835e12),
    (("H100", "PCIE"), "H100 PCIe", 756e12),
    (("H100",), "H100 SXM", 989e12),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("H200", "NVL"), "H200 NVL", 835e12),
    (("GH200",), "GH200", 989e12),
    (("H200",), "H200 SXM", 989e12),
    (("A100", "PCIE"), "A100 PCIe", 312e12),
    (("A100",), "A100 SXM", 312e12),
    (("L40S",), "L40S", 362e12),
    (("A10G",), "A10G", 125e12),
    (("L4",), "L4", 121e12),
    (("4090",), "RTX 4090", 165e12),
)
"""Dense bf16 tensor-core peak FLOP/s (no sparsity) from NVIDIA's data sheets: the name's words that
pick a row (first match wins, most specific first), the part it means, the peak. The PCIe and NVL
H100s run at lower clocks than the SXM part, so one figure for every H100 put a PCIe card's MFU a
quarter too low (756 against 989). A10G, L4 and RTX 4090 are the figures the table had before, not
re-checked in issue 17. A device no row names reports MFU as null."""


def device_peak(name: str) -> tuple[str, float] | None:
    """(part, dense bf16 peak FLOP/s) for a CUDA device name, or None for a device not in the table.

    Words are matched whole ("NVIDIA A100-SXM4-80GB" -> A100, SXM4, 80GB), so an L40 is not an L4."""
    words = set(re.split(r"[^A-Z0-9]+", name.upper()))
    for needed, part, flops in PEAK_BF16_FLOPS:
        if all(w in words for w in needed):
            return part, flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None on CPU (a CPU MFU would be a made-up figure) and on
    devices the table does not know."""
    if device.type != "cuda":
        return None
    found = device_peak(torch.cuda.get_device_name(device))
    return found[1] if found else None


def matmul_params(model: nn.Module, config: Any) -> int:
    """Parameters that cost 6 FLOPs per token in training (torchtitan's count, for MFU).

    An embedding table is a lookup, not a matmul, so it is left out (about 6% of a 1B Llama with a
    32k vocabulary) unless it is tied to the output head, which multiplies by it. A Mixture of
    Experts' routed experts count by the share of them a token visits (top_k / experts). Sharded
    models count whole: FSDP2 DTensors report their full numel, ZeRO-3 keeps it in ds_numel.
    """
    params = {id(p): p for p in model.parameters()}
    weight = dict.fromkeys(params, 1.0)
    text = text_config(config)
    experts = next((getattr(text, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(text, k, None)), None)
    top_k = getattr(text, "num_experts_per_tok", None)
    head_ids: set[int] = set()
    for name, module in model.named_modules():
        if experts and top_k and name.rsplit(".", 1)[-1] == "experts":
            weight.update(dict.fromkeys((id(p) for p in module.parameters()), top_k / experts))
        out = getattr(module, "get_output_embeddings", None)
        if callable(out) and out() is not None:
            head_ids |= {id(p) for p in out().parameters()}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            weight.update({id(p): 0.0 for p in module.parameters(recurse=False) if id(p) not in head_ids})
    return round(sum(getattr(p, "ds_numel", p.numel()) * weight[i] for i, p in params.items()))


def attention_flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and their weighted sum: per layer 12 x heads x
    head_dim x the tokens it attends to (q.k and p.v: 2 matmuls forward, 4 backward, 2 FLOPs per
    multiply-add; the causal half is not discounted, flash attention's recomputation not counted:
    torchtitan's convention). A sliding-window layer attends to at most its window."""
    text = text_config(config)
    heads = dimension(text, "num_attention_heads")
    head_dim = getattr(text, "head_dim", None) or dimension(text, "hidden_size") // heads
    layers = dimension(text, "num_hidden_layers")
    window = getattr(text, "sliding_window", None) or 0
    kinds = getattr(text, "layer_types", None)
    if not kinds:
        windowed = window and getattr(text, "use_sliding_window", True) is not False
        kinds = ["sliding_attention" if windowed else "full_attention"] * layers
    attended = sum(min(seq_len, window) if kind == "sliding_attention" and window else seq_len for kind in kinds)
    return 12.0 * heads * head_dim * attended


def flops_per_token(model: nn.Module, config: Any, seq_len: int) -> float:
    """Model FLOPs per trained token, the numerator of MFU: 6 x matmul parameters (2 forward, 4
    backward) plus attention (:func:`attention_flops_per_token`); ``config`` is the model's HF config
    and ``seq_len`` the row length (data.max_length). Activation checkpointing's recomputed forward
    is not counted (MFU, not hardware FLOPs utilisation)."""
    return 6.0 * matmul_params(model, config) + attention_flops_per_token(config, seq_len)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory for a metrics record. CUDA: the allocator's allocated (``peak_mem_mb``) and reserved
    (``peak_mem_reserved_mb``) peaks since the previous call, which resets them, so each record shows its
    own steps (an eval or a save in between counts towards the next). CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        out = {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20,
               "peak_mem_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
        torch.cuda.reset_peak_memory_stats(device)  # allocator counters on the host: no device sync
        return out
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB


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
