"""The stage phase of a save: this rank's fragments, checked and laid out as the write will need them.

Staging is everything a save must take from the live training state at the moment of the save:
which ranges of which tensors this rank stores (the index entries), the tensors themselves, and
the rank's RNG state. After it, the write and the commit read only what was staged. A synchronous
save stages the live storage itself (no copy: it is written before training goes on); an
asynchronous one copies every fragment into a :class:`StagingBuffer` in host memory (allocated at
the first save and reused; pinned when CUDA is there, so the device-to-host copies are fast) and
training goes on while a background writer reads the copy. The NaN/inf check runs in the write
phase (:func:`check_finite`), on what was staged, so that it does not block training either.

Nothing here is collective and nothing touches the disk; a problem is raised as a CheckpointError
that the save reports on every rank (:mod:`fft_dist.checkpoint.checkpointer`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.faults import fault_point
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


class StagingBuffer:
    """Host tensors that hold one rank's fragments between a save's stage and its write, one per
    fragment key, allocated at the first save and reused by every later one (a fragment whose size
    or dtype changed gets a new one). Pinned on CUDA machines: page-locked memory is what lets the
    device-to-host copy run at full speed."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self.pin = torch.cuda.is_available()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def copy(self, key: str, src: torch.Tensor) -> torch.Tensor:
        """`src` copied into this key's host tensor (asynchronously from a device: see :meth:`settle`)."""
        buf = self._tensors.get(key)
        if buf is None or buf.numel() != src.numel() or buf.dtype != src.dtype:
            buf = torch.empty(src.numel(), dtype=src.dtype, device="cpu", pin_memory=self.pin)
            self._tensors[key] = buf
        buf.copy_(src.reshape(-1), non_blocking=self.pin and src.is_cuda)
        return buf

    def settle(self) -> None:
        """Wait for the device-to-host copies in flight (none on CPU)."""
        if self.pin and torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()


def _owned_elements(frag) -> int:
    """The elements of `frag` inside its tensor (ZeRO-3's last partition may carry padding)."""
    stop = min(int(frag.flat_start) + frag.local.numel(), fmt.numel(frag.full_shape))
    return max(0, stop - int(frag.flat_start))


def _bytes_held(frags) -> int:
    return sum(_owned_elements(frag) * frag.local.element_size() for frag in frags)


def staged_bytes(strategy) -> int:
    """The bytes this rank's fragments hold: what a :class:`StagingBuffer` costs in host memory."""
    return _bytes_held(strategy.fragments())


def projected_staging_bytes(strategy, *, state_bytes_per_param: int, frozen: Collection[str]) -> int:
    """What this rank's staging buffer will hold once its optimizer has states, known before the first
    step: :func:`staged_bytes` where the optimizer has made its states (DeepSpeed at start, a resumed
    run), else the weights' bytes plus `state_bytes_per_param` for each trainable element the rank owns
    (a fresh torch optimizer makes its states at its first step). The formula of `estimate`'s
    ``stage`` column, with this rank's real share."""
    frags = list(strategy.fragments())
    held = _bytes_held(frags)
    if any(frag.kind != "param" for frag in frags):
        return held
    frozen = set(frozen)
    return held + state_bytes_per_param * sum(_owned_elements(frag) for frag in frags if frag.name not in frozen)


def check_finite(staged: Staged) -> None:
    """Refuse NaN/inf in any staged fragment (params and optimizer states: a NaN in either ruins the
    resume); the error names the tensor, its kind and the flat element."""
    where = {e[7]: e for e in staged.entries}
    for key, t in (*staged.model_items, *staged.optim_items):
        bad = first_nonfinite(t)
        if bad is not None:
            name, kind, start = where[key][0], where[key][1], where[key][4]
            raise CheckpointError(f"{name} ({kind}) holds NaN/inf (first at flat element {start + bad}); "
                                  f"a checkpoint never stores non-finite values")


def stage_fragments(strategy, *, rank: int, world: int, step: int, into: StagingBuffer | None = None) -> Staged:
    """Walk ``strategy.fragments()`` once: every fragment trimmed to its tensor (ZeRO-3's last
    partition may carry padding), refused if it repeats a key, copied `into` the staging buffer when
    one is given, and filed under the model or the optimizer shard. The RNG state is captured first,
    as the save found it. The ``mid_stage`` fault point fires once the first fragment is staged."""
    staged = Staged(rank=rank, world=world, step=step, rng=capture_rng())
    seen: set[str] = set()
    for i, frag in enumerate(strategy.fragments()):
        if i == 1:
            fault_point("mid_stage", step)
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
        key = fmt.tensor_key(frag.name, frag.kind, start)
        if key in seen:
            raise CheckpointError(f"rank {rank} yielded {frag.name} ({frag.kind}) at {start} twice")
        seen.add(key)
        if into is not None:
            local = into.copy(key, local)
        is_param = frag.kind == fmt.PARAM_KIND
        (staged.model_items if is_param else staged.optim_items).append((key, local))
        staged.entries.append([frag.name, frag.kind, [int(d) for d in frag.full_shape], fmt.dtype_name(local.dtype),
                               start, stop, staged.model_file if is_param else staged.optim_file, key])
    if into is not None:
        into.settle()
    return staged
