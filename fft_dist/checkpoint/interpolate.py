"""Interpolation with the base at export: (1 - alpha) * theta + alpha * theta_0, one tensor at a time.

theta_0 is read from a Hugging Face folder the user names (``fft-dist export --base``): the path a
checkpoint records as ``model_path`` is a record of the run, never opened (see fft_dist.checkpoint.format),
so the user passes it, and the message that asks for it names it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.hf_source import HFFolderSource


class InterpolationUsageError(ValueError):
    """--interpolate-base out of [0, 1], or without a base folder to read theta_0 from (a usage error, exit 2)."""


def base_hint(state: dict) -> str:
    """What to pass as --base, from the checkpoint's record of where the run started."""
    path = (state.get("meta") or {}).get("model_path")
    if path:
        return f"the run started from model.path={path}: pass --base {path}"
    return ("the run started from seeded weights (model.path unset), which no folder holds: pass --base with a "
            "Hugging Face folder of the weights to interpolate with")


def check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise InterpolationUsageError(f"--interpolate-base {alpha}: must be in [0, 1]")
    return float(alpha)


class BaseMix:
    """Mixes each checkpoint tensor (by parameter name) with the base folder's tensor of that name.

    alpha = 0 returns the checkpoint's tensor itself and alpha = 1 the base's (so the ends are exact, bit for
    bit); in between, ``torch.lerp`` in float32. A base without the tensor, or with another shape, is refused."""

    def __init__(self, folder: Path, alpha: float, model) -> None:
        self.alpha = check_alpha(alpha)
        self.folder = Path(folder)
        self._source = HFFolderSource(self.folder, model=model)

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0:
            return value
        shape = self._source.shape(name) if self._source.has(name, fmt.PARAM_KIND) else None
        if shape is None:
            raise CheckpointError(f"--base {self.folder}: has no tensor for {name}")
        if tuple(shape) != tuple(value.shape):
            raise CheckpointError(f"--base {self.folder}: {name} has shape {list(shape)}, the checkpoint "
                                  f"{list(value.shape)} (not the model this run started from?)")
        base = self._source.read(name, fmt.PARAM_KIND, 0, fmt.numel(shape)).reshape(shape)
        if self.alpha == 1.0:
            return base.to(value.dtype)
        return torch.lerp(value.float(), base.float(), self.alpha)

    def close(self) -> None:
        self._source.close()
