"""Per-rank RNG state as plain JSON (python, numpy, torch CPU, CUDA): no pickle anywhere."""
from __future__ import annotations

import base64
import random

import numpy as np
import torch


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict:
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "key": [int(x) for x in key], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def check_rng(state: dict, where: str) -> None:
    """Raise CheckpointError unless restore_rng(state) will succeed (checked before the model is loaded)."""
    from fft_dist.checkpoint.format import CheckpointError

    try:
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.RandomState().set_state((n["kind"], np.asarray(n["key"], dtype=np.uint32), n["pos"],
                                           n["has_gauss"], n["cached_gaussian"]))
        saved = _unb64(state["torch"])
        if saved.numel() != torch.get_rng_state().numel():
            raise ValueError(f"torch state has {saved.numel()} bytes, expected {torch.get_rng_state().numel()}")
        for s in state.get("cuda") or []:
            _unb64(s)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{where}: malformed RNG state: {type(e).__name__}: {e}") from None


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
        else:  # another GPU count per process: seed each visible device from the first saved state
            for i in range(torch.cuda.device_count()):
                torch.cuda.set_rng_state(_unb64(cuda[min(i, len(cuda) - 1)]), i)


def rng_for_rank(states: list[dict], rank: int) -> dict:
    """Which saved state a rank restores.

    Same world size: its own. Another world size: rank r takes saved rank ``r % W``. (Exact
    RNG continuity across a world-size change is impossible anyway, since the ranks see
    different data; this keeps every rank's stream valid and deterministic. fft-dist seeds
    all ranks identically, so in practice every saved state is the same.)
    """
    if not states:
        raise ValueError("no RNG states saved")
    return states[rank % len(states)]
