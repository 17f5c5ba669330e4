"""Sharded load of a pretrained Hugging Face folder: each rank reads only the rows it owns."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.collective import agree_or_raise
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.reader import shape_problems, strategy_shapes
from fft_dist.checkpoint.schema import check_relpath
from fft_dist.models.conversions import Group, LoadPlan, convert, expert_rows, meta_model, plan_load

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFFolderSource:
    """A FragmentSource (kind 'param' only) over ``model.safetensors`` or a sharded HF folder.

    Names are the model's parameter names; which folder tensors make each one, and how, is transformers'
    answer (:func:`fft_dist.models.conversions.plan_load` on `model`, a meta-device model; by default one
    built from the folder's config.json): renamed keys, the base model's prefix added or dropped, a tied
    parameter the folder omits (``lm_head.weight``) read from its partner, and fused tensors converted
    from the tensors ``save_pretrained`` writes (an MoE's one tensor per expert). A name the model does not
    have is served from the folder tensor of that exact name, if any.

    ``read(name, 'param', a, b)`` reads only what the flat range ``[a, b)`` needs: for a plain tensor, the
    rows of dim 0 that cover it (``get_slice(key)[r0:r1]``); for experts stacked along dim 0, only the
    experts whose rows cover it, converted by transformers' own operations; any other conversion, the
    whole target, assembled and freed once its range is cut out (a conversion with several targets is
    kept until another is read). So a rank that owns 1/N of every tensor reads about 1/N of the bytes.
    Values come back in the file's dtype; the strategy casts them.
    """

    def __init__(self, path: str | Path, *, model: nn.Module | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such model folder")
        self._handles: dict[str, Any] = {}
        if (self.path / INDEX_FILE).is_file():
            idx = fmt.read_json(self.path / INDEX_FILE, "safetensors index")
            wmap = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wmap, dict) or not all(isinstance(k, str) for k in wmap):
                raise CheckpointError(f"{self.path / INDEX_FILE}: no 'weight_map' object of tensor name -> file")
            for key, file in wmap.items():
                check_relpath(file, f"{self.path / INDEX_FILE}: weight_map[{key!r}]")
            self.weight_map: dict[str, str] = dict(wmap)
        elif (self.path / SINGLE_FILE).is_file():
            self.weight_map = dict.fromkeys(self._handle(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            others = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {others}: pickle files are not loaded; convert them to safetensors)" if others else ""
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        for f in sorted(set(self.weight_map.values())):
            if not (self.path / f).is_file():
                raise CheckpointError(f"{self.path / f}: missing (named in {INDEX_FILE})")
        self.model = model if model is not None else self._folder_model()
        self._plan: LoadPlan | None = None
        self._whole: tuple[Group, dict[str, torch.Tensor]] | None = None

    def _folder_model(self) -> nn.Module | None:
        """The model config.json describes, on the meta device; None without config.json (names as they are)."""
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            return None
        if not isinstance(fmt.read_json(cfg_path, "model config"), dict):
            raise CheckpointError(f"{cfg_path}: not a JSON object (a Hugging Face model config)")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(self.path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
            raise CheckpointError(f"{cfg_path}: not a usable transformers config: {e}") from None
        return meta_model(config)

    @property
    def plan(self) -> LoadPlan:
        if self._plan is None:
            shapes = {key: self._key_shape(key) for key in self.weight_map}
            self._plan = plan_load(self.model, shapes, str(self.path))
        return self._plan

    def _handle(self, file: str):
        from safetensors import safe_open

        h = self._handles.get(file)
        if h is None:
            try:
                h = self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{self.path / file}: unreadable safetensors file: {e}") from None
        return h

    def _key_shape(self, key: str) -> tuple[int, ...]:
        file = self.weight_map[key]
        try:
            return tuple(self._handle(file).get_slice(key).get_shape())
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{self.path / file}: cannot read {key}: {e}") from None

    def _rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """The flat range [start, stop) of the folder tensor `key`, reading only the rows of dim 0 it covers."""
        file = self.weight_map[key]
        shape = self._key_shape(key)
        try:
            sl = self._handle(file).get_slice(key)
            if len(shape) == 0:
                return sl[:].reshape(1)[start:stop]
            row = fmt.numel(shape[1:])
            r0, r1 = (0, 0) if start == stop or row == 0 else (start // row, -(-stop // row))
            return sl[r0:r1].reshape(-1)[start - r0 * row : stop - r0 * row]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path / file}: cannot read {key}: {e}") from None

    def _full(self, key: str) -> torch.Tensor:
        return self._rows(key, 0, fmt.numel(self._key_shape(key))).reshape(self._key_shape(key))

    def _group(self, name: str) -> Group | None:
        group = self.plan.params.get(name)
        if group is None and name in self.weight_map:  # a name the model does not have, asked for as it is
            group = Group(name, {name: [name]}, shapes={name: self._key_shape(name)})
        return group

    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str, kind: str) -> bool:
        return kind == fmt.PARAM_KIND and self._group(name) is not None

    def shape(self, name: str) -> tuple[int, ...] | None:
        group = self._group(name)
        return None if group is None else group.shapes[self.plan.target(name)]

    def read(self, name: str, kind: str, start: int, stop: int) -> torch.Tensor:
        group = self._group(name) if kind == fmt.PARAM_KIND else None
        if group is None:
            raise CheckpointError(f"{self.path}: {name} ({kind}) is not in this model folder")
        shape = self.shape(name)
        if not 0 <= start <= stop <= fmt.numel(shape):
            raise CheckpointError(f"{self.path}: range [{start}, {stop}) is outside {name} (shape {list(shape)})")
        if group.converter is None:
            return self._rows(group.keys()[0], start, stop)
        target = self.plan.target(name)
        try:
            if group.by_expert:  # only the experts whose rows cover [start, stop)
                e0, e1 = expert_rows(group, start, stop)
                if e0 == e1:
                    return self._rows(group.keys()[0], 0, 0)  # nothing to read
                part = convert(group, self._full, self.model, (e0, e1))[target].reshape(-1)
                offset = e0 * fmt.numel(shape[1:])
                return part[start - offset : stop - offset]
            if len(group.shapes) == 1:  # the whole target, assembled, cut, and freed
                return convert(group, self._full, self.model)[target].reshape(-1)[start:stop].clone()
            if self._whole is None or self._whole[0] is not group:  # one conversion, several targets (a split):
                self._whole = None  # kept for the next target's read, one conversion at a time
                self._whole = (group, convert(group, self._full, self.model))
            return self._whole[1][target].reshape(-1)[start:stop]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers' operations raise torch's errors
            raise CheckpointError(f"{self.path}: cannot make {name} from {group.keys()[0]} ...: "
                                  f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._handles.clear()
        self._whole = None


class FreshHead:
    """A FragmentSource: `source`, plus new-head parameters it lacks, initialised as transformers
    initialises a Linear (weights normal(0, std), biases 0) from a generator seeded by `seed` and the
    name, so every rank and every backend starts from the same head. The head is small (labels x
    hidden), so each rank draws it whole and cuts its range out."""

    def __init__(self, source, shapes: dict[str, tuple[int, ...]], *, std: float, seed: int):
        self._source, self._shapes, self._std, self._seed = source, shapes, std, seed
        self._full: dict[str, torch.Tensor] = {}

    def has(self, name: str, kind: str) -> bool:
        if name in self._shapes:
            return kind == fmt.PARAM_KIND
        return self._source.has(name, kind)

    def read(self, name: str, kind: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._shapes:
            return self._source.read(name, kind, start, stop)
        if name not in self._full:
            import zlib

            shape = self._shapes[name]
            full = torch.zeros(shape, dtype=torch.float32)
            if len(shape) > 1:
                g = torch.Generator().manual_seed(self._seed * 1_000_003 + zlib.crc32(name.encode()))
                full.normal_(0.0, self._std, generator=g)
            self._full[name] = full.reshape(-1)
        return self._full[name][start:stop]


def _training_model(strategy) -> nn.Module | None:
    """The model `strategy` trains, rebuilt on the meta device from its config (None: a strategy without
    one, e.g. a test's): its conversions and tied weights are the ones that matter, not config.json's."""
    from transformers import PretrainedConfig

    for attr in ("module", "model"):  # DeepSpeed: the engine's module; FSDP2 / none: the model itself
        config = getattr(getattr(strategy, attr, None), "config", None)
        if isinstance(config, PretrainedConfig):
            return meta_model(config)
    return None


def load_pretrained(strategy, path: str | Path, *, new_head: list[str] = (), init_std: float = 0.02,
                    seed: int = 0, wrap=None) -> list[str]:
    """Collective: check every model parameter against the folder (names + shapes), then load.

    The folder is read as ``from_pretrained`` reads it (:class:`HFFolderSource`: transformers' renamings,
    fused-expert conversions and tied weights). Parameters the folder lacks, or has with another shape,
    are listed in one CheckpointError on every rank before anything is loaded, with the folder's tensors
    that no parameter is made from. Tensors in the folder that the model does not have (buffers such as
    rotary caches, or heads of another task) are ignored. Names in `new_head` (a task head on a
    pretrained backbone) that the folder lacks start fresh (:class:`FreshHead`); returns those names, so
    the caller can say so. `wrap` (source -> source) serves the model from the folder where they differ
    on purpose (a grown vocabulary: :class:`fft_dist.models.vocab.GrownVocabulary`).
    """
    folder = None
    try:
        folder = HFFolderSource(path, model=_training_model(strategy))
        source = wrap(folder) if wrap is not None else folder
        problems = []
    except CheckpointError as e:
        source, problems = None, [str(e)]
    agree_or_raise(problems, f"model.path={path} cannot be loaded:")
    expected = strategy_shapes(strategy)
    fresh: dict[str, tuple[int, ...]] = {}
    try:
        fresh = {n: tuple(expected[n]) for n in new_head if n in expected and source.shape(n) is None}
        # source_names=(): extra tensors in an HF folder are fine (see above), unlike in a checkpoint.
        problems = shape_problems({n: s for n, s in expected.items() if n not in fresh}, source.shape, (), str(path))
        if any(": missing from " in p for p in problems) and folder.plan.unused:
            unused = folder.plan.unused
            problems.append(f"in {path} but made into no parameter ({len(unused)}): {', '.join(unused[:12])}"
                            + (f", ... ({len(unused) - 12} more)" if len(unused) > 12 else ""))
    except CheckpointError as e:
        problems = [str(e)]
    agree_or_raise(problems, f"model.path={path} does not match the model (nothing was loaded):")
    strategy.load_fragments(FreshHead(source, fresh, std=init_std, seed=seed) if fresh else source)
    source.close()
    return sorted(fresh)
