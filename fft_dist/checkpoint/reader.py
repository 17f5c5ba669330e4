"""Finding, verifying and reading checkpoints: any flat range of any tensor, at any world size."""
from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.rng import restore_rng, rng_for_rank
from fft_dist.checkpoint.writer import hash_file, iter_committed
from fft_dist.dist import all_gather_small, rank_world


# -- completeness and checksums --------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    path = Path(path)
    mpath = path / fmt.MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not mpath.is_file():
        hint = " (a save in progress or one that was killed)" if path.name.endswith(fmt.TMP_SUFFIX) else ""
        raise CheckpointError(f"{path}: incomplete checkpoint: {fmt.MANIFEST_FILE} is missing{hint}")
    manifest = fmt.read_json(mpath, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME or "files" not in manifest:
        raise CheckpointError(f"{mpath}: not an fft-dist checkpoint manifest")
    if int(manifest.get("format_version", 0)) > fmt.FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format version {manifest.get('format_version')} is newer than this "
                              f"fft-dist understands ({fmt.FORMAT_VERSION}); upgrade fft-dist")
    return manifest


def check_files(path: Path, manifest: dict, *, checksums: bool, only: list[str] | None = None) -> list[str]:
    """Problems with the files a manifest lists: missing, wrong size (truncated), wrong sha256."""
    problems = []
    names = list(manifest["files"]) if only is None else only
    for rel in names:
        rec = manifest["files"][rel]
        f = Path(path) / rel
        if not f.is_file():
            problems.append(f"{f}: missing (listed in {fmt.MANIFEST_FILE})")
            continue
        size = f.stat().st_size
        if size != rec["size"]:
            what = "truncated" if size < rec["size"] else "too long"
            problems.append(f"{f}: {what}: {size} bytes, the manifest says {rec['size']}")
            continue
        if checksums:
            _, digest = hash_file(f)
            if digest != rec["sha256"]:
                problems.append(f"{f}: sha256 mismatch (file changed or corrupted): {digest[:16]}..., "
                                f"the manifest says {rec['sha256'][:16]}...")
    if only is None:
        for required in (fmt.INDEX_FILE, fmt.TRAIN_STATE_FILE):
            if required not in manifest["files"]:
                problems.append(f"{Path(path) / fmt.MANIFEST_FILE}: does not list {required}")
    return problems


def verify_checkpoint(path: Path, *, checksums: bool = True) -> list[str]:
    """Every problem with a checkpoint folder (empty list: complete and every checksum matches)."""
    try:
        manifest = read_manifest(Path(path))
    except CheckpointError as e:
        return [str(e)]
    problems = check_files(path, manifest, checksums=checksums)
    if not problems:
        try:
            CheckpointReader(path)  # index parses and its ranges tile every tensor
        except CheckpointError as e:
            problems.append(str(e))
    return problems


def is_complete(path: Path) -> bool:
    """Cheap check (manifest + file sizes, no hashing) used to pick a resume candidate."""
    try:
        return not check_files(path, read_manifest(path), checksums=False)
    except CheckpointError:
        return False


def checkpoint_info(path: Path) -> dict:
    path = Path(path)
    manifest = read_manifest(path)
    state = fmt.read_json(path / fmt.TRAIN_STATE_FILE, "train state")
    index = fmt.read_json(path / fmt.INDEX_FILE, "index")
    tensors = index["tensors"]
    kinds: dict[str, int] = {}
    param_elems = 0
    for t in tensors.values():
        param_elems += fmt.numel(t["shape"])
        for kind in t["kinds"]:
            kinds[kind] = kinds.get(kind, 0) + 1
    model_bytes = sum(r["size"] for f, r in manifest["files"].items() if f.startswith(fmt.MODEL_DIR + "/"))
    optim_bytes = sum(r["size"] for f, r in manifest["files"].items() if f.startswith(fmt.OPTIM_DIR + "/"))
    return {
        "path": str(path), "step": state.get("step"), "backend": state.get("backend"),
        "world_size": state.get("world_size"), "format_version": state.get("format_version"),
        "fft_dist_version": state.get("fft_dist_version"), "created": state.get("created"),
        "tensors": len(tensors), "parameters": param_elems, "state_kinds": kinds,
        "model_bytes": model_bytes, "optim_bytes": optim_bytes,
        "bytes": sum(r["size"] for r in manifest["files"].values()), "files": len(manifest["files"]),
        "train_state": state.get("train_state"),
    }


# -- finding the checkpoint to resume from ---------------------------------------------------------
def find_resume(resume: str, ckpt_root: Path) -> Path | None:
    """'none' -> None; 'auto' -> the newest complete checkpoint under ckpt_root (or None);
    anything else -> that checkpoint folder, or a checkpoint root's newest (error if neither)."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return newest_complete(Path(ckpt_root))
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume={resume}: {path} does not exist")
    if not (path / fmt.MANIFEST_FILE).exists() and ((path / fmt.LATEST_FILE).exists() or any(iter_committed(path))):
        found = newest_complete(path)
        if found is None:
            raise CheckpointError(f"resume={resume}: {path} is a checkpoint folder with no complete checkpoint")
        return found
    problems = check_files(path, read_manifest(path), checksums=False)
    if problems:
        raise CheckpointError(f"resume={resume}: {path} is not a complete checkpoint:\n  " + "\n  ".join(problems))
    return path


def newest_complete(ckpt_root: Path) -> Path | None:
    """The folder named by ``latest`` when it is complete; otherwise the highest complete step-N."""
    if not ckpt_root.is_dir():
        return None
    latest = ckpt_root / fmt.LATEST_FILE
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        if name and "/" not in name and is_complete(ckpt_root / name):
            return ckpt_root / name
    for _, p in iter_committed(ckpt_root):
        if is_complete(p):
            return p
    return None


# -- reading ranges --------------------------------------------------------------------------------------
class CheckpointReader:
    """A FragmentSource over a checkpoint folder: serves any flat range of any (name, kind).

    Stored ranges are stitched together, and each piece is read with safetensors'
    ``get_slice(key)[a:b]``, so only the bytes needed are touched. Never unpickles.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        ipath = self.path / fmt.INDEX_FILE
        if not ipath.is_file():
            raise CheckpointError(f"{ipath}: missing (the checkpoint has no index of its tensors)")
        index = fmt.read_json(ipath, "index")
        if not isinstance(index, dict) or index.get("format") != fmt.FORMAT_NAME or "tensors" not in index:
            raise CheckpointError(f"{ipath}: not an fft-dist checkpoint index")
        self.index = index
        self.tensors: dict[str, dict] = index["tensors"]
        self._starts: dict[tuple[str, str], list[int]] = {}
        self._handles: dict[str, Any] = {}
        for name, t in self.tensors.items():
            for kind, k in t["kinds"].items():
                ranges = k["ranges"]
                pos, total = 0, fmt.numel(k["shape"])
                for start, stop, file, _ in ranges:
                    if start != pos or stop < start:
                        raise CheckpointError(f"{ipath}: ranges of {name} ({kind}) do not tile it at {pos} ({file})")
                    pos = stop
                if pos != total:
                    raise CheckpointError(f"{ipath}: ranges of {name} ({kind}) cover {pos} of {total} elements")
                self._starts[(name, kind)] = [r[0] for r in ranges]

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
def _agree(problems: list[str]) -> list[str]:
    """Union of every rank's problems, in rank order, so that all ranks raise (or go on) together."""
    out: list[str] = []
    for ps in all_gather_small(problems):
        for p in ps:
            if p not in out:
                out.append(p)
    return out


def _raise(problems: list[str], head: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise CheckpointError(head + "\n  " + "\n  ".join(problems[:40]) + more)


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


def load_checkpoint(strategy, path: Path, *, verify: bool = True) -> dict:
    """Verify `path`, check it fits `strategy`'s model, load every rank's ranges, restore RNG.

    Collective. Order: manifest present and sizes right -> sha256 of every file (split over
    the ranks) -> index parses and tiles every tensor -> every model parameter exists with the
    same full shape (and nothing extra) -> ``strategy.load_fragments`` -> this rank's RNG. Any
    problem raises :class:`CheckpointError` on every rank before the model is touched.
    Returns the ``train_state`` dict that was passed to save_checkpoint.
    """
    path = Path(path)
    rank, world = rank_world()
    try:
        manifest = read_manifest(path)
        problems = check_files(path, manifest, checksums=False)
    except CheckpointError as e:
        manifest, problems = None, [str(e)]
    _raise(_agree(problems), f"cannot load {path}:")
    if verify:
        names = sorted(manifest["files"], key=lambda f: -manifest["files"][f]["size"])
        mine = names[rank::world]  # largest first, dealt round-robin: balanced hashing
        _raise(_agree(check_files(path, manifest, checksums=True, only=mine)), f"cannot load {path}:")
    try:
        reader = CheckpointReader(path)
        state = fmt.read_json(path / fmt.TRAIN_STATE_FILE, "train state")
        problems = []
    except CheckpointError as e:
        reader, state, problems = None, None, [str(e)]
    _raise(_agree(problems), f"cannot load {path}:")
    expected = strategy_shapes(strategy)
    problems = shape_problems(expected, lambda n: reader.shape(n) if reader.has(n, fmt.PARAM_KIND) else None,
                              reader.names(), f"checkpoint {path.name}")
    _raise(problems, f"checkpoint {path} does not match the model (nothing was loaded):")
    strategy.load_fragments(reader)
    reader.close()
    saved_rng = state.get("rng") or []
    if saved_rng:
        restore_rng(rng_for_rank(saved_rng, rank))
    out = dict(state.get("train_state") or {})
    return out


def read_train_state(path: Path) -> dict:
    """The full train_state.json (versions, backend, world size, config YAML, model config...)."""
    return fmt.read_json(Path(path) / fmt.TRAIN_STATE_FILE, "train state")
