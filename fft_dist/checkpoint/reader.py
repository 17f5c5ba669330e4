"""Reading checkpoints: any flat range of any tensor, at any world size; the collective load."""
from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.collective import agree_or_raise, raise_problems
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.integrity import check_files
from fft_dist.checkpoint.layout import resolve_checkpoint
from fft_dist.checkpoint.rng import restore_rng, rng_for_rank
from fft_dist.checkpoint.schema import check_agree, read_index, read_manifest, read_train_state_file
from fft_dist.dist import all_gather_small, rank_world


# -- reading ranges --------------------------------------------------------------------------------------
class CheckpointReader:
    """A FragmentSource over a checkpoint folder: serves any flat range of any (name, kind).

    Stored ranges are stitched together, and each piece is read with safetensors'
    ``get_slice(key)[a:b]``, so only the bytes needed are touched. Never unpickles.
    """

    def __init__(self, path: Path, *, manifest: dict | None = None):
        """`path`: a step-N folder, a checkpoint root or its ``latest``. `manifest` (already validated):
        also require every shard the index names to be listed in it."""
        self.path = resolve_checkpoint(path)
        self.index = read_index(self.path, manifest=manifest)  # types, safe paths, exact tiling
        self.tensors: dict[str, dict] = self.index["tensors"]
        self._starts: dict[tuple[str, str], list[int]] = {
            (name, kind): [r[0] for r in k["ranges"]] for name, t in self.tensors.items()
            for kind, k in t["kinds"].items()}
        self._handles: dict[str, Any] = {}

    # FragmentSource
    def has(self, name: str, kind: str) -> bool:
        return name in self.tensors and kind in self.tensors[name]["kinds"]

    def read(self, name: str, kind: str, start: int, stop: int) -> torch.Tensor:
        k = self._kind(name, kind)
        total = fmt.numel(k["shape"])
        if not 0 <= start <= stop <= total:
            raise CheckpointError(f"{self.path}: range [{start}, {stop}) is outside {name} ({kind}), "
                                  f"which has {total} elements (shape {k['shape']})")
        dtype = fmt.dtype_from_name(k["dtype"])
        if start == stop:
            return torch.empty(0, dtype=dtype)
        ranges = k["ranges"]
        i = bisect.bisect_right(self._starts[(name, kind)], start) - 1
        pieces = []
        pos = start
        while pos < stop:
            r_start, r_stop, file, key = ranges[i]
            a, b = pos - r_start, min(stop, r_stop) - r_start
            pieces.append(self._slice(file, key, a, b, name, kind))
            pos = r_start + b
            i += 1
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out if out.dtype == dtype else out.to(dtype)

    # conveniences
    def names(self) -> list[str]:
        return list(self.tensors)

    def kinds(self, name: str) -> list[str]:
        return list(self.tensors[name]["kinds"])

    def shape(self, name: str, kind: str = fmt.PARAM_KIND) -> tuple[int, ...]:
        return tuple(self._kind(name, kind)["shape"])

    def dtype(self, name: str, kind: str = fmt.PARAM_KIND) -> torch.dtype:
        return fmt.dtype_from_name(self._kind(name, kind)["dtype"])

    def read_full(self, name: str, kind: str = fmt.PARAM_KIND) -> torch.Tensor:
        shape = self.shape(name, kind)
        return self.read(name, kind, 0, fmt.numel(shape)).reshape(shape)

    def nbytes(self, name: str, kind: str = fmt.PARAM_KIND) -> int:
        return fmt.numel(self.shape(name, kind)) * torch.empty(0, dtype=self.dtype(name, kind)).element_size()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _kind(self, name: str, kind: str) -> dict:
        try:
            return self.tensors[name]["kinds"][kind]
        except KeyError:
            have = sorted(self.tensors[name]["kinds"]) if name in self.tensors else None
            detail = f"it has {have}" if have is not None else "no such tensor"
            raise CheckpointError(f"{self.path}: {name} ({kind}) is not in the checkpoint ({detail})") from None

    def _slice(self, file: str, key: str, a: int, b: int, name: str, kind: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            h = self._handles.get(file)
            if h is None:
                h = self._handles[file] = safe_open(str(self.path / file), framework="pt")
            return h.get_slice(key)[a:b]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path / file}: cannot read {name} ({kind}) [{key}]: {e}") from None


# -- the collective load ------------------------------------------------------------------------------------
def strategy_shapes(strategy) -> dict[str, tuple[int, ...]]:
    """name -> full shape of every parameter any rank of `strategy` holds (collective)."""
    mine = {}
    for frag in strategy.fragments():
        if frag.kind == fmt.PARAM_KIND:
            mine[frag.name] = [int(d) for d in frag.full_shape]
    merged: dict[str, tuple[int, ...]] = {}
    for part in all_gather_small(mine):
        for k, v in part.items():
            merged.setdefault(k, tuple(v))
    return merged


def shape_problems(expected: dict[str, tuple[int, ...]], source_shape, source_names, where: str) -> list[str]:
    problems = []
    for name, shape in expected.items():
        got = source_shape(name)
        if got is None:
            problems.append(f"{name}: missing from {where} (the model has shape {list(shape)})")
        elif tuple(got) != tuple(shape):
            problems.append(f"{name}: {where} has shape {list(got)}, the model has {list(shape)}")
    extra = sorted(set(source_names) - set(expected))
    for name in extra:
        problems.append(f"{name}: in {where} (shape {list(source_shape(name))}) but not in the model")
    return problems


class ParamsOnly:
    """A FragmentSource view that hides the optimizer states: the strategy then keeps a fresh
    optimizer, as when loading a pretrained folder (``checkpoint.load_optimizer=false``)."""

    def __init__(self, source):
        self._source = source

    def has(self, name: str, kind: str) -> bool:
        return kind == fmt.PARAM_KIND and self._source.has(name, kind)

    def read(self, name: str, kind: str, start: int, stop: int):
        return self._source.read(name, kind, start, stop)


def load_checkpoint(strategy, path: Path, *, verify: bool = True, params_only: bool = False) -> dict:
    """Verify `path`, check it fits `strategy`'s model, load every rank's ranges, restore RNG.

    Collective. `path`: a step-N folder, a checkpoint root or its ``latest``. Order: manifest
    valid, files present with their sizes -> sha256 of every file (split over the ranks) ->
    index and train state parsed by their specs (:mod:`.schema`), every shard listed in the
    manifest -> every model parameter exists with the same full shape (and nothing extra) ->
    ``strategy.load_fragments`` -> this rank's RNG. Any problem raises the same
    :class:`CheckpointError` on every rank before the model is touched. Returns the ``train_state``
    dict that was passed to save_checkpoint.
    ``params_only``: load the weights and leave the optimizer fresh (a deliberate optimizer switch).
    """
    rank, world = rank_world()
    try:
        path = resolve_checkpoint(path)
        manifest = read_manifest(path)
        problems = check_files(path, manifest, checksums=False)
    except CheckpointError as e:
        manifest, problems = None, [str(e)]
    agree_or_raise(problems, f"cannot load {path}:")
    if verify:
        names = sorted(manifest["files"], key=lambda f: -manifest["files"][f]["size"])
        mine = names[rank::world]  # largest first, dealt round-robin: balanced hashing
        agree_or_raise(check_files(path, manifest, checksums=True, only=mine), f"cannot load {path}:")
    try:
        reader = CheckpointReader(path, manifest=manifest)
        state = read_train_state_file(path)  # its spec: one restorable RNG state per saved rank
        check_agree(path, manifest, reader.index, state)
        saved_rng = rng_for_rank(state["rng"], rank)
        problems = []
    except CheckpointError as e:
        reader, state, saved_rng, problems = None, None, None, [str(e)]
    agree_or_raise(problems, f"cannot load {path}:")
    expected = strategy_shapes(strategy)
    problems = shape_problems(expected, lambda n: reader.shape(n) if reader.has(n, fmt.PARAM_KIND) else None,
                              reader.names(), f"checkpoint {path.name}")
    raise_problems(problems, f"checkpoint {path} does not match the model (nothing was loaded):")
    strategy.load_fragments(ParamsOnly(reader) if params_only else reader)
    reader.close()
    restore_rng(saved_rng)
    return dict(state["train_state"])


def read_train_state(path: Path) -> dict:
    """The full, validated train_state.json (versions, backend, world size, config YAML, model config...).
    `path`: a step-N folder, a checkpoint root or its ``latest``."""
    return read_train_state_file(resolve_checkpoint(path))
