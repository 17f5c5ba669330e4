"""The one place that checks a checkpoint's metadata files (manifest, index, train state, ``latest``).

Each file has one spec (:data:`MANIFEST_SPEC`, :data:`INDEX_SPEC`, :data:`TRAIN_STATE_SPEC`,
written in :mod:`.spec`'s terms) and everything read from a checkpoint folder is parsed by it
before it is used: a flipped bit, a hand-edited file or a hostile path becomes a
:class:`CheckpointError` naming the file and the field, never a KeyError deep inside a reader,
a path outside the folder, or a silent run on a negative step. Unknown fields are refused
everywhere: a field this version does not know is one it would silently ignore.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.rng import RNG_SPEC
from fft_dist.checkpoint.spec import (
    JSON_OBJECT,
    Check,
    Const,
    Int,
    Invalid,
    ListOf,
    MapOf,
    Nullable,
    Obj,
    Str,
    Tuple,
    parse,
)

LATEST_MAX_BYTES = 4096
"""A ``latest`` file holds one ``step-N`` name; anything longer is refused unread."""


def check_relpath(rel: Any, where: str) -> str:
    """`rel` is a plain relative path that stays inside the checkpoint folder; else CheckpointError."""
    problem = _relpath_problem(rel)
    if problem:
        raise CheckpointError(f"{where}: file path {rel!r} {problem}")
    return rel


def _relpath_problem(rel: Any) -> str | None:
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or "\x00" in rel or re.match(r"^[A-Za-z]:", rel) \
            or any(p in ("", ".", "..") for p in parts):
        return "is absolute or leaves the checkpoint folder; refusing it"
    return None


# -- the fields every file shares --------------------------------------------------------------------
def _not_newer(version: int) -> str | None:
    if version > fmt.FORMAT_VERSION:
        return (f"format version {version} is newer than this fft-dist understands ({fmt.FORMAT_VERSION}); "
                "upgrade fft-dist")
    return None


FORMAT = Const(fmt.FORMAT_NAME)
VERSION = Check(Int(1), _not_newer, expected=f"a format version up to {fmt.FORMAT_VERSION}")
COUNT = Int(0)
"""Anything that counts (steps, bytes, elements): 0 <= n < 2**53."""
WORLD_SIZE = Int(1, 1 << 20)
RUN_ID = Str(r"[0-9a-f]{12,64}", expected="a run id (12 to 64 lowercase hex digits)")
CREATED = Str(max_len=64)
VERSION_TEXT = Str(max_len=128)
SHA256 = Str(r"[0-9a-f]{64}", expected="a sha256 (64 lowercase hex digits)")
RELPATH = Check(Str(min_len=1), _relpath_problem, expected="a relative path inside the checkpoint folder")


def _dtype_problem(name: str) -> str | None:
    try:
        fmt.dtype_from_name(name)
    except CheckpointError as e:
        return str(e)
    return None


DTYPE = Check(Str(max_len=64), _dtype_problem, expected="a dtype name")
SHAPE = ListOf(COUNT, max_len=64)


# -- MANIFEST.json -----------------------------------------------------------------------------------
def _files_problem(files: dict) -> str | None:
    if fmt.MANIFEST_FILE in files:
        return "the manifest lists itself"
    missing = [f for f in (fmt.INDEX_FILE, fmt.TRAIN_STATE_FILE) if f not in files]
    return f"it does not list {', '.join(missing)}" if missing else None


MANIFEST_SPEC = Obj(
    {"format": FORMAT, "format_version": VERSION, "step": COUNT, "world_size": WORLD_SIZE, "created": CREATED,
     "files": Check(MapOf(Obj({"size": COUNT, "sha256": SHA256}), key=RELPATH), _files_problem,
                    expected="every file of the checkpoint but the manifest")},
    {"run_id": RUN_ID},
    expected="an fft-dist checkpoint manifest (a JSON object)")


def validate_manifest(obj: Any, where: Path) -> dict:
    return parse(MANIFEST_SPEC, obj, str(where))


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


# -- index.json ----------------------------------------------------------------------------------------
RANGE = Tuple(COUNT, COUNT, Str(min_len=1), Str(min_len=1, max_len=8192), expected="[start, stop, file, key]")
KIND = Obj({"shape": SHAPE, "dtype": DTYPE, "ranges": ListOf(RANGE)})


def _tensor_problem(t: dict) -> None:
    param = t["kinds"].get(fmt.PARAM_KIND)
    if param is None:
        raise Invalid(("kinds",), f"has no {fmt.PARAM_KIND!r} entry (every tensor stores its parameter)")
    if param["shape"] != t["shape"] or param["dtype"] != t["dtype"]:
        raise Invalid((), f"shape/dtype {t['shape']} {t['dtype']} differ from its {fmt.PARAM_KIND!r} entry's "
                          f"{param['shape']} {param['dtype']}")


TENSOR = Obj({"shape": SHAPE, "dtype": DTYPE,
              "kinds": MapOf(KIND, key=Str(r"[^@]{1,256}", expected="a state kind"), min_len=1)},
             after=_tensor_problem)
INDEX_SPEC = Obj({"format": FORMAT, "format_version": VERSION, "world_size": WORLD_SIZE,
                  "tensors": MapOf(TENSOR, min_len=1, expected="an object with at least one tensor")},
                 expected="an fft-dist checkpoint index (a JSON object)")


def validate_index(obj: Any, where: Path, *, listed: set[str] | None = None) -> dict:
    """The spec, then safe shard paths (listed in the manifest when `listed` is given), and ranges that
    are sorted, contiguous and cover each (tensor, kind) exactly."""
    obj = parse(INDEX_SPEC, obj, str(where))
    for name, t in obj["tensors"].items():
        for kind, k in t["kinds"].items():
            kwhat = f"{where}: {name} ({kind})"
            pos, total = 0, fmt.numel(k["shape"])
            for start, stop, file, _ in k["ranges"]:
                check_relpath(file, f"{kwhat}: range {start}..{stop}")
                if listed is not None and file not in listed:
                    raise CheckpointError(f"{kwhat}: shard {file!r} is not listed in {fmt.MANIFEST_FILE}")
                if start != pos or stop < start:
                    raise CheckpointError(f"{where}: ranges of {name} ({kind}) do not tile it at {pos} ({file})")
                pos = stop
            if pos != total:
                raise CheckpointError(f"{where}: ranges of {name} ({kind}) cover {pos} of {total} elements")
    return obj


def read_index(folder: Path, *, manifest: dict | None = None) -> dict:
    ipath = Path(folder) / fmt.INDEX_FILE
    if not ipath.is_file():
        raise CheckpointError(f"{ipath}: missing (the checkpoint has no index of its tensors)")
    listed = set(manifest["files"]) if manifest is not None else None
    return validate_index(fmt.read_json(ipath, "index"), ipath, listed=listed)


# -- train_state.json ------------------------------------------------------------------------------------
META_SPEC = Obj({}, {
    "model_path": Nullable(Str()), "optimizer": Str(max_len=64), "task": Str(max_len=64),
    "tokenizer_dir": Nullable(Str()), "generation_config": Nullable(JSON_OBJECT),
}, expected="an object of run facts")
"""``meta``: what save_checkpoint's caller passed, less config_yaml, model_config and backend (their own
fields). Record only: paths in it are never read (export takes the tokenizer from the checkpoint's
own copy or an explicit argument)."""


def _one_rng_per_rank(obj: dict) -> None:
    """Before the states are checked: 10,000 copies of one are refused at once."""
    ws, rng = obj["world_size"], obj["rng"]
    if type(rng) is list and type(ws) is int and len(rng) != ws:
        raise Invalid(("rng",), f"expected one RNG state per rank (world_size {ws}), got {len(rng)}")


TRAIN_STATE_SPEC = Obj(
    {"format": FORMAT, "format_version": VERSION, "fft_dist_version": VERSION_TEXT, "torch_version": VERSION_TEXT,
     "step": COUNT, "world_size": WORLD_SIZE, "backend": Str(max_len=64), "created": CREATED,
     "train_state": JSON_OBJECT, "rng": ListOf(RNG_SPEC, min_len=1), "config_yaml": Nullable(Str(max_len=1 << 24)),
     "model_config": Nullable(JSON_OBJECT), "meta": META_SPEC},
    {"run_id": RUN_ID},
    expected="an fft-dist train state (a JSON object)", before=_one_rng_per_rank)
"""The envelope. ``train_state`` is the caller's own dict, checked only as an object here (the fft-dist
trainer's sections: :func:`fft_dist.train_state.parse_trainer_state`)."""


def validate_train_state(obj: Any, where: Path) -> dict:
    return parse(TRAIN_STATE_SPEC, obj, str(where))


def read_train_state_file(folder: Path) -> dict:
    path = Path(folder) / fmt.TRAIN_STATE_FILE
    return validate_train_state(fmt.read_json(path, "train state"), path)


def check_agree(folder: Path, manifest: dict, index: dict, state: dict) -> None:
    """The three files describe the same save: one step, one world size (a mixed-up copy otherwise)."""
    folder = Path(folder)
    if manifest["step"] != state["step"]:
        raise CheckpointError(f"{folder / fmt.TRAIN_STATE_FILE}: field step: {state['step']}, but "
                              f"{fmt.MANIFEST_FILE} says {manifest['step']}")
    for name, obj in ((fmt.INDEX_FILE, index), (fmt.TRAIN_STATE_FILE, state)):
        if obj["world_size"] != manifest["world_size"]:
            raise CheckpointError(f"{folder / name}: field world_size: {obj['world_size']}, but "
                                  f"{fmt.MANIFEST_FILE} says {manifest['world_size']}")
    named = fmt.parse_step(folder.name)
    if named is not None and named != manifest["step"]:
        raise CheckpointError(f"{folder / fmt.MANIFEST_FILE}: field step: {manifest['step']}, but the folder is "
                              f"named {folder.name}")


# -- latest ------------------------------------------------------------------------------------------------
def parse_latest(text: bytes | str, where: Path) -> str:
    """The folder name held by a ``latest`` file: exactly one ``step-N`` name, nothing else. Its content
    is never echoed (``latest`` may be anything, even a link to a secret): only its size is."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not fmt.STEP_DIR_RE.match(name):
        raise CheckpointError(f"{where}: holds {len(data)} bytes that are not a step-N folder name")
    return name


def read_latest_file(path: Path) -> str:
    """Read ``latest`` only when it is a small regular file: a symbolic link, a folder, a FIFO or a
    device is refused unread (following a link would read, and might show, a file outside the root)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symbolic link; refusing to follow it (expected a file holding "
                                  "one step-N folder name)") from None
        raise CheckpointError(f"{path}: unreadable: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file; expected a file holding one step-N folder name")
        if st.st_size > LATEST_MAX_BYTES:
            raise CheckpointError(f"{path}: holds {st.st_size} bytes that are not a step-N folder name")
        data = os.read(fd, LATEST_MAX_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return parse_latest(data, path)
