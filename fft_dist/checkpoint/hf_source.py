"""Sharded load of a pretrained Hugging Face folder: each rank reads only the rows it owns."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.collective import agree_or_raise
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.reader import shape_problems, strategy_shapes
from fft_dist.checkpoint.schema import check_relpath

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


class HFFolderSource:
    """A FragmentSource (kind 'param' only) over ``model.safetensors`` or a sharded HF folder.

    ``read(name, 'param', a, b)`` opens the tensor lazily, reads only the rows of dim 0 that
    cover the flat range ``[a, b)`` (``get_slice(key)[r0:r1]``) and cuts the range out, so a
    rank that owns 1/N of every tensor reads about 1/N of the bytes and holds about 1/N of the
    model. Values come back in the file's dtype; the strategy casts them.

    Name resolution, in order: the exact name; the name without its first component (older
    files saved from the base model, e.g. ``h.0...`` for ``transformer.h.0...``); and, for an
    output embedding (``lm_head.weight``) absent from the files, the input embedding, because
    HF omits a tied lm_head when saving (unless config.json says tie_word_embeddings=false).
    """

    def __init__(self, path: str | Path):
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
        self.tied = True
        cfg_path = self.path / "config.json"
        if cfg_path.is_file():
            cfg = fmt.read_json(cfg_path, "model config")
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{cfg_path}: not a JSON object (a Hugging Face model config)")
            self.tied = cfg.get("tie_word_embeddings", True) is not False
        self._resolved: dict[str, str | None] = {}

    def _resolve(self, name: str) -> str | None:
        if name in self._resolved:
            return self._resolved[name]
        key = None
        if name in self.weight_map:
            key = name
        elif "." in name and name.split(".", 1)[1] in self.weight_map:
            key = name.split(".", 1)[1]
        elif self.tied and name.endswith(OUTPUT_EMBEDDINGS):
            cands = [k for k in self.weight_map if k.endswith(INPUT_EMBEDDING_SUFFIXES)]
            if len(cands) == 1:
                key = cands[0]
        self._resolved[name] = key
        return key

    def _handle(self, file: str):
        from safetensors import safe_open

        h = self._handles.get(file)
        if h is None:
            try:
                h = self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{self.path / file}: unreadable safetensors file: {e}") from None
        return h

    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str, kind: str) -> bool:
        return kind == fmt.PARAM_KIND and self._resolve(name) is not None

    def shape(self, name: str) -> tuple[int, ...] | None:
        key = self._resolve(name)
        if key is None:
            return None
        file = self.weight_map[key]
        try:
            return tuple(self._handle(file).get_slice(key).get_shape())
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{self.path / file}: cannot read {key}: {e}") from None

    def read(self, name: str, kind: str, start: int, stop: int) -> torch.Tensor:
        key = self._resolve(name) if kind == fmt.PARAM_KIND else None
        if key is None:
            raise CheckpointError(f"{self.path}: {name} ({kind}) is not in this model folder")
        file = self.weight_map[key]
        shape = self.shape(name)
        total = fmt.numel(shape)
        if not 0 <= start <= stop <= total:
            raise CheckpointError(f"{self.path / file}: range [{start}, {stop}) is outside {key} (shape {list(shape)})")
        try:
            sl = self._handle(file).get_slice(key)
            if len(shape) == 0:
                return sl[:].reshape(1)[start:stop]
            row = fmt.numel(shape[1:])
            if start == stop or row == 0:
                r0 = r1 = 0
            else:
                r0, r1 = start // row, -(-stop // row)
            rows = sl[r0:r1]
            return rows.reshape(-1)[start - r0 * row : stop - r0 * row]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path / file}: cannot read {key}: {e}") from None

    def close(self) -> None:
        self._handles.clear()


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


def load_pretrained(strategy, path: str | Path, *, new_head: list[str] = (), init_std: float = 0.02,
                    seed: int = 0, wrap=None) -> list[str]:
    """Collective: check every model parameter against the folder (names + shapes), then load.

    Parameters the folder lacks, or has with another shape, are listed in one CheckpointError
    on every rank before anything is loaded. Tensors in the folder that the model does not have
    (buffers such as rotary caches, or heads of another task) are ignored. Names in `new_head`
    (a task head on a pretrained backbone) that the folder lacks start fresh (:class:`FreshHead`);
    returns those names, so the caller can say so. `wrap` (source -> source) serves the model from the
    folder where they differ on purpose (a grown vocabulary: :class:`fft_dist.models.vocab.GrownVocabulary`).
    """
    try:
        source = HFFolderSource(path)
        source = wrap(source) if wrap is not None else source
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
    except CheckpointError as e:
        problems = [str(e)]
    agree_or_raise(problems, f"model.path={path} does not match the model (nothing was loaded):")
    strategy.load_fragments(FreshHead(source, fresh, std=init_std, seed=seed) if fresh else source)
    source.close()
    return sorted(fresh)
