"""Rank-0 metrics: metrics.jsonl, TensorBoard events, MFU and peak-memory helpers."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

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


class MetricsWriter:
    """Writes one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self._file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        except ImportError:  # tensorboard is a declared dependency; stay usable without it
            self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key.replace("eval_", "eval/") if key.startswith("eval_") else f"train/{key}",
                                        value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
