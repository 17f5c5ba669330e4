"""The stage phase of a save: this rank's fragments, checked and laid out as the write will need them.

Staging is everything a save must take from the live training state at the moment of the save:
which ranges of which tensors this rank stores (the index entries), the tensors themselves, and
the rank's RNG state. After it, the write and the commit read only what was staged, so that an
asynchronous save (issue 21) can stage into a host buffer here and let training go on. Today the
staged tensors are the live storage itself (no copy): the synchronous save writes them at once.

Nothing here is collective and nothing touches the disk; a problem is raised as a CheckpointError
that the save reports on every rank (:mod:`fft_dist.checkpoint.checkpointer`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.rng import capture_rng

_FINITE_CHUNK = 1 << 20  # elements per isfinite() call: its temporaries (a bool and a float copy) stay ~5 MB


@dataclass
class Staged:
    """One rank's part of one save, as the write phase needs it."""

    rank: int
    world: int
    step: int
    model_items: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    """(safetensors key, 1-D tensor) for the model shard, in the strategy's order."""
    optim_items: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    entries: list[list] = field(default_factory=list)
    """[name, kind, full_shape, dtype, start, stop, file, key] per fragment, for the index."""
    rng: dict | None = None
    """This rank's RNG state at the save (train_state.json keeps every rank's)."""

    @property
    def model_file(self) -> str:
        return fmt.shard_file(fmt.MODEL_DIR, self.rank, self.world)

    @property
    def optim_file(self) -> str:
        return fmt.shard_file(fmt.OPTIM_DIR, self.rank, self.world)


def first_nonfinite(t: torch.Tensor) -> int | None:
    """Flat index of the first NaN/inf element of a floating tensor (None if all finite), in chunks."""
    if not t.is_floating_point():
        return None
    flat = t.reshape(-1)
    for s in range(0, flat.numel(), _FINITE_CHUNK):
        part = flat[s : s + _FINITE_CHUNK]
        if not bool(torch.isfinite(part).all()):
            return s + int((~torch.isfinite(part)).nonzero()[0, 0])
    return None


def stage_fragments(strategy, *, rank: int, world: int, step: int) -> Staged:
    """Walk ``strategy.fragments()`` once: every fragment trimmed to its tensor (ZeRO-3's last
    partition may carry padding), refused if it holds NaN/inf or repeats a key, and filed under the
    model or the optimizer shard. The RNG state is captured first, as the save found it."""
    staged = Staged(rank=rank, world=world, step=step, rng=capture_rng())
    seen: set[str] = set()
    for frag in strategy.fragments():
        local = frag.local.detach()
        if local.dim() != 1:
            local = local.reshape(-1)
        total = fmt.numel(frag.full_shape)
        start = int(frag.flat_start)
        stop = min(start + local.numel(), total)
        if stop <= start:
            continue
        if stop - start != local.numel():
            local = local[: stop - start]
        bad = first_nonfinite(local)  # params and optimizer states: a NaN in either ruins the resume
        if bad is not None:
            raise CheckpointError(f"{frag.name} ({frag.kind}) holds NaN/inf (first at flat element {start + bad}); "
                                  f"a checkpoint never stores non-finite values")
        key = fmt.tensor_key(frag.name, frag.kind, start)
        if key in seen:
            raise CheckpointError(f"rank {rank} yielded {frag.name} ({frag.kind}) at {start} twice")
        seen.add(key)
        is_param = frag.kind == fmt.PARAM_KIND
        (staged.model_items if is_param else staged.optim_items).append((key, local))
        staged.entries.append([frag.name, frag.kind, [int(d) for d in frag.full_shape], fmt.dtype_name(local.dtype),
                               start, stop, staged.model_file if is_param else staged.optim_file, key])
    return staged
