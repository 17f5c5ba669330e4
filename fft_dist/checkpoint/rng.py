"""Per-rank RNG state as plain JSON (python, numpy, torch CPU, CUDA): no pickle anywhere.

:data:`RNG_SPEC` is that JSON form's spec: a state it accepts is one :func:`restore_rng` restores,
so a bad entry is refused by the reader before any weight is loaded, not half-way through a resume.
"""
from __future__ import annotations

import base64
import binascii
import random

import numpy as np
import torch

from fft_dist.checkpoint.spec import Check, Float, Int, ListOf, Nullable, Obj, Str, Tuple


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8).clone()


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


def _restorable(state: dict) -> str | None:
    """Why :func:`restore_rng` would fail on a well-typed `state` (None: it will succeed)."""
    version, internal, gauss = state["python"]
    n = state["numpy"]
    for what, attempt in (
        ("python", lambda: random.Random().setstate((version, tuple(internal), gauss))),
        ("numpy", lambda: np.random.RandomState().set_state(
            (n["kind"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))),
    ):
        try:
            attempt()
        except (TypeError, ValueError, OverflowError) as e:
            return f"{what}: {str(e)[:80]}"
    try:
        saved = _unb64(state["torch"])
        for s in state["cuda"]:
            _unb64(s)
    except (binascii.Error, ValueError):
        return "torch/cuda: not base64"
    if saved.numel() != torch.get_rng_state().numel():
        return f"torch: {saved.numel()} bytes, expected {torch.get_rng_state().numel()}"
    return None


_WORD = Int(0, 2**32 - 1)
RNG_SPEC = Check(Obj({
    "python": Tuple(Int(0, 1000), ListOf(_WORD, min_len=625, max_len=625), Nullable(Float()),
                    expected="[version, [625 integers], gauss_next]"),
    "numpy": Obj({"kind": Str(max_len=64), "key": ListOf(_WORD, min_len=624, max_len=624), "pos": Int(0, 624),
                  "has_gauss": Int(0, 1), "cached_gaussian": Float()}),
    "torch": Str(min_len=1, max_len=1 << 16, expected="base64 of torch.get_rng_state()"),
    "cuda": ListOf(Str(max_len=1 << 16), max_len=1 << 12),
}), _restorable, expected="a restorable RNG state")
"""One rank's entry of train_state.json's ``rng`` list (the form :func:`capture_rng` writes)."""


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
