"""The one place that checks a checkpoint's JSON files (manifest, index, train state, ``latest``).

Everything read from a checkpoint folder passes through here before it is used, so a flipped
bit, a hand-edited file or a hostile path becomes a :class:`CheckpointError` that names the
file and the entry, never a KeyError deep inside a reader or a path outside the folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape_ok(shape: Any) -> bool:
    return isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)


def check_relpath(rel: Any, where: str) -> str:
    """`rel` is a plain relative path that stays inside the checkpoint folder; else CheckpointError."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{where}: file path {rel!r} is not a non-empty string")
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or "\x00" in rel or re.match(r"^[A-Za-z]:", rel) \
            or any(p in ("", ".", "..") for p in parts):
        raise CheckpointError(f"{where}: file path {rel!r} is absolute or leaves the checkpoint folder; refusing it")
    return rel


def parse_latest(text: bytes | str, where: Path) -> str:
    """The folder name held by a ``latest`` file: exactly one ``step-N`` name, nothing else."""
    try:
        name = (text.decode("utf-8") if isinstance(text, bytes) else text).strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: not a text file (expected one step-N folder name)") from None
    if not fmt.STEP_DIR_RE.match(name):
        shown = name if len(name) <= 60 else name[:60] + "..."
        raise CheckpointError(f"{where}: holds {shown!r}, not a step-N folder name")
    return name


def read_latest_file(path: Path) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable: {e.strerror or e}") from None
    return parse_latest(data, path)


# -- MANIFEST.json ---------------------------------------------------------------------------------
def validate_manifest(obj: Any, where: Path) -> dict:
    if not isinstance(obj, dict) or obj.get("format") != fmt.FORMAT_NAME:
        raise CheckpointError(f"{where}: not an fft-dist checkpoint manifest")
    version = obj.get("format_version")
    if not _is_int(version):
        raise CheckpointError(f"{where}: format_version is {version!r}, not an integer")
    if version > fmt.FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {version} is newer than this fft-dist understands "
                              f"({fmt.FORMAT_VERSION}); upgrade fft-dist")
    files = obj.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: 'files' is missing or not an object")
    for rel, rec in files.items():
        check_relpath(rel, f"{where}: entry {rel!r}")
        if rel == fmt.MANIFEST_FILE:
            raise CheckpointError(f"{where}: lists itself")
        if not isinstance(rec, dict) or not _is_int(rec.get("size")) or rec["size"] < 0:
            raise CheckpointError(f"{where}: entry {rel!r} has no valid 'size' (got {rec!r})")
        if not isinstance(rec.get("sha256"), str) or not _SHA256.match(rec["sha256"]):
            raise CheckpointError(f"{where}: entry {rel!r} has no valid 'sha256' (got {rec!r})")
    for required in (fmt.INDEX_FILE, fmt.TRAIN_STATE_FILE):
        if required not in files:
            raise CheckpointError(f"{where}: does not list {required}")
    return obj


def read_manifest(folder: Path) -> dict:
    """The validated manifest of a checkpoint folder (its presence marks a completed save)."""
    folder = Path(folder)
    mpath = folder / fmt.MANIFEST_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not mpath.is_file():
        hint = " (a save in progress or one that was killed)" if folder.name.endswith(fmt.TMP_SUFFIX) else ""
        raise CheckpointError(f"{folder}: incomplete checkpoint: {fmt.MANIFEST_FILE} is missing{hint}")
    return validate_manifest(fmt.read_json(mpath, "manifest"), mpath)


# -- index.json --------------------------------------------------------------------------------------
def validate_index(obj: Any, where: Path, *, listed: set[str] | None = None) -> dict:
    """Types of every field, safe shard paths (listed in the manifest when `listed` is given), and
    ranges that are sorted, contiguous and cover each (tensor, kind) exactly."""
    if not isinstance(obj, dict) or obj.get("format") != fmt.FORMAT_NAME or not isinstance(obj.get("tensors"), dict):
        raise CheckpointError(f"{where}: not an fft-dist checkpoint index")
    for name, t in obj["tensors"].items():
        what = f"{where}: tensor {name!r}"
        if not isinstance(t, dict) or not _shape_ok(t.get("shape")) or not isinstance(t.get("kinds"), dict):
            raise CheckpointError(f"{what}: malformed entry (needs shape, dtype, kinds)")
        _dtype(t.get("dtype"), what)
        for kind, k in t["kinds"].items():
            kwhat = f"{where}: {name} ({kind})"
            if not isinstance(k, dict) or not _shape_ok(k.get("shape")) or not isinstance(k.get("ranges"), list):
                raise CheckpointError(f"{kwhat}: malformed entry (needs shape, dtype, ranges)")
            _dtype(k.get("dtype"), kwhat)
            pos, total = 0, fmt.numel(k["shape"])
            for r in k["ranges"]:
                if not (isinstance(r, list) and len(r) == 4 and _is_int(r[0]) and _is_int(r[1])
                        and isinstance(r[3], str)):
                    raise CheckpointError(f"{kwhat}: malformed range {r!r} (expected [start, stop, file, key])")
                start, stop, file, _ = r
                check_relpath(file, f"{kwhat}: range {start}..{stop}")
                if listed is not None and file not in listed:
                    raise CheckpointError(f"{kwhat}: shard {file!r} is not listed in {fmt.MANIFEST_FILE}")
                if start != pos or stop < start:
                    raise CheckpointError(f"{where}: ranges of {name} ({kind}) do not tile it at {pos} ({file})")
                pos = stop
            if pos != total:
                raise CheckpointError(f"{where}: ranges of {name} ({kind}) cover {pos} of {total} elements")
    return obj


def _dtype(name: Any, where: str) -> None:
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: dtype {name!r} is not a string")
    try:
        fmt.dtype_from_name(name)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None


def read_index(folder: Path, *, manifest: dict | None = None) -> dict:
    ipath = Path(folder) / fmt.INDEX_FILE
    if not ipath.is_file():
        raise CheckpointError(f"{ipath}: missing (the checkpoint has no index of its tensors)")
    listed = set(manifest["files"]) if manifest is not None else None
    return validate_index(fmt.read_json(ipath, "index"), ipath, listed=listed)


# -- train_state.json --------------------------------------------------------------------------------
_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,), "world_size": (int,), "train_state": (dict,), "rng": (list,),
    "backend": (str, type(None)), "config_yaml": (str, type(None)), "model_config": (dict, type(None)),
    "meta": (dict, type(None)), "created": (str, type(None)), "fft_dist_version": (str, type(None)),
}


def validate_train_state(obj: Any, where: Path) -> dict:
    if not isinstance(obj, dict) or obj.get("format") != fmt.FORMAT_NAME:
        raise CheckpointError(f"{where}: not an fft-dist train state")
    for key, types in _STATE_FIELDS.items():
        value = obj.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{where}: field {key!r} is {type(value).__name__} {_short(value)}, expected {want}")
    for r, state in enumerate(obj["rng"]):
        _check_rng(state, f"{where}: rng[{r}]")
    return obj


def _check_rng(state: Any, where: str) -> None:
    ok = isinstance(state, dict)
    py = state.get("python") if ok else None
    ok = ok and isinstance(py, list) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], list) \
        and all(_is_int(x) for x in py[1]) and (py[2] is None or isinstance(py[2], (int, float)))
    npy = state.get("numpy") if ok else None
    ok = ok and isinstance(npy, dict) and isinstance(npy.get("kind"), str) and isinstance(npy.get("key"), list) \
        and all(_is_int(x) for x in npy["key"]) and _is_int(npy.get("pos")) and _is_int(npy.get("has_gauss")) \
        and isinstance(npy.get("cached_gaussian"), (int, float))
    ok = ok and isinstance(state.get("torch"), str) and isinstance(state.get("cuda", []), list) \
        and all(isinstance(c, str) for c in state.get("cuda", []))
    if not ok:
        raise CheckpointError(f"{where}: malformed RNG state (expected python, numpy, torch, cuda entries)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def read_train_state_file(folder: Path) -> dict:
    path = Path(folder) / fmt.TRAIN_STATE_FILE
    return validate_train_state(fmt.read_json(path, "train state"), path)
