"""The fft-dist checkpoint format: one layout for every backend and every world size.

Every backend we support (FSDP2 row shards, ZeRO-3 flat partitions, ZeRO-2 group partitions,
a single process) owns, of each parameter and of each optimizer state, a *contiguous range of
the flattened full tensor*. A checkpoint therefore stores exactly those ranges, as 1-D tensors,
and an index that says which file holds which range. Reading any other split (another world
size, another backend) is just reading other ranges; nothing is ever converted.

Layout
------
::

    <checkpoint.dir>/
      step-0000100/                                 one complete checkpoint ("step-%07d")
        model/shard-00000-of-00002.safetensors      rank 0's ranges of the parameters (kind "param")
        model/shard-00001-of-00002.safetensors
        optim/shard-00000-of-00002.safetensors      rank 0's ranges of the optimizer states
        optim/shard-00001-of-00002.safetensors
        tokenizer/...                               optional copy of the tokenizer files
        index.json                                  where every range of every tensor lives
        train_state.json                            loop state, per-rank RNG, config, versions
        MANIFEST.json                               size + sha256 of every other file; written last
      step-0000100.tmp/                             a save in progress (never read)
      latest                                        text file: the folder name of the newest commit

A save writes into ``step-N.tmp/``, fsyncs every file and the folder, renames it to
``step-N/``, fsyncs the parent, and only then replaces ``latest`` atomically
(``latest.tmp`` + ``os.replace``). A folder without a valid ``MANIFEST.json`` is incomplete
and is refused, with the reason, by every reader. A save that fails (full disk, non-finite
values, a rank's error) removes its ``step-N.tmp/``; one that is killed leaves it, and the next
save removes it. ``latest`` is a regular file holding exactly one ``step-N`` name: a symbolic
link, a folder or any other content is refused without being read further or echoed (the
error gives its size, never its content).

Damaged checkpoints
-------------------
A ``step-N/`` folder whose manifest is missing or malformed, or whose files are missing or have
the wrong size, is *damaged* (the cheap check; loading also verifies every sha256).
``resume=auto`` skips damaged folders with a warning that names them and resumes from the
newest intact one (``latest`` first when it names an intact folder); when checkpoints exist
but none is intact it refuses (exit 4) rather than start again from step 0. Pruning
(``keep_last``) counts only intact checkpoints and never touches a damaged one: damaged
folders stay, untouched, for a person to inspect (``fft-dist ckpt verify``) and delete.
Checkpoints named in ``save_checkpoint(protect=...)`` (e.g. the best-eval one) are never pruned.

Paths
-----
Every path in ``MANIFEST.json`` and ``index.json`` is relative, uses ``/``, and has no ``..``
or empty component: it stays inside the checkpoint folder. Every shard file the index names
is listed in the manifest. Readers refuse anything else (see :mod:`.schema`). Paths recorded
in ``meta`` (``model_path``, ``tokenizer_dir``) are a record of the run only: no reader opens
them (export takes the tokenizer from an explicit argument or the checkpoint's own
``tokenizer/`` copy, listed in the manifest).

Strictness
----------
Each metadata file has one spec (:mod:`.schema`, in the terms of :mod:`.spec`); every reader
(verify, info, resume, load, export) parses the file with it before using any value. The
specs below are exact: a missing field, a field of another type (a bool is never an integer;
``1.0`` and ``1e30`` are not integers), a count outside ``0 <= n < 2**53`` (``world_size``:
1 to 2**20), a string that does not match its pattern, or *any field not listed* is refused
with a :class:`CheckpointError` (exit 4) naming the file and the field's dotted path, e.g.
``train_state.json: field rng: expected one RNG state per rank (world_size 2), got 0``. A
``format_version`` newer than this fft-dist's is refused with "upgrade fft-dist". The three
files must agree on ``step`` and ``world_size``, and a ``step-N`` folder's N is its step. The
full check (``ckpt verify``, export) also compares every shard's safetensors header with the
index: each range's key, length and dtype, and no tensor the index leaves out.
Numbers inside the opaque values (``model_config``, ``train_state``, ``meta.generation_config``)
belong to their owners: the fft-dist trainer's ``train_state`` has its own spec,
:func:`fft_dist.train_state.parse_trainer_state`.

Shard files
-----------
Plain safetensors files (no pickle). Every tensor is 1-D and stored under the key
``"{name}@{kind}@{flat_start}"`` (see :func:`tensor_key`), e.g.
``model.layers.0.mlp.up_proj.weight@exp_avg@49152``. ``name`` is the parameter name in the
unwrapped Hugging Face model; ``kind`` is ``param`` or an optimizer-state key (``exp_avg``,
``exp_avg_sq``, ``momentum_buffer``, ``step`` ...). The safetensors ``__metadata__`` holds
``{"format": "pt", "fft_dist_format": "1", "rank": "...", "world_size": "..."}``.

index.json
----------
::

    {
      "format": "fft-dist-checkpoint", "format_version": 1,
      "world_size": 2,
      "tensors": {                           # at least one
        "<name>": {
          "shape": [d0, d1, ...],            # full shape of the parameter
          "dtype": "float32",                # dtype of the stored parameter ranges
          "kinds": {
            "param":   {"shape": [...], "dtype": "float32",
                        "ranges": [[start, stop, "model/shard-00000-of-00002.safetensors", "<key>"], ...]},
            "exp_avg": {"shape": [...], "dtype": "float32", "ranges": [...]},
            "step":    {"shape": [1],   "dtype": "float32", "ranges": [[0, 1, "optim/...", "<key>"]]}
          }
        }
      }
    }

``ranges`` are sorted, do not overlap, and cover ``[0, numel(shape))`` of that kind exactly;
the writer refuses to commit anything else. Each kind carries its own shape and dtype because
some states (the scalar ``step``) are not shaped like the parameter. Every tensor has a
``param`` kind, whose shape and dtype are the tensor's. Kind names hold no ``@``.

train_state.json
----------------
``{"format", "format_version", "fft_dist_version": str, "torch_version": str, "step": int,
"world_size": int, "backend": str, "created": str, "train_state": {<the caller's dict, returned
by load_checkpoint; any JSON object here>}, "rng": [<rank 0>, <rank 1>, ...], "config_yaml": str
| null, "model_config": {...} | null, "meta": {...}, "run_id"?: str}``. ``rng`` has exactly
``world_size`` entries, each JSON (no pickle) that restores: ``{"python": [version, [625 ints],
gauss_next], "numpy": {"kind", "key": [624 ints], "pos", "has_gauss", "cached_gaussian"},
"torch": "<base64 of torch.get_rng_state()>", "cuda": ["<base64>", ...]}``. ``meta`` holds
only these optional keys (what save_checkpoint's caller passed, less ``config_yaml``,
``model_config`` and ``backend``, which have fields of their own): ``model_path`` (str|null),
``optimizer`` (str), ``task`` (str), ``tokenizer_dir`` (str|null; a record, never read back),
``generation_config`` (the model's generation_config.json as an object, or null; export writes
it as it is).

MANIFEST.json
-------------
``{"format", "format_version", "step", "world_size", "created", "files": {"<relative path>":
{"size": int, "sha256": "<hex>"}}, "run_id"?: str}``: every file of the checkpoint except the
manifest itself (index.json and train_state.json included). Written last, after everything it
lists is fsynced, so its presence marks a complete checkpoint.

``run_id`` (optional, in MANIFEST.json and train_state.json): the id of the run that wrote the
checkpoint, 12 to 64 lowercase hex digits. Checkpoints written before it existed lack it and
stay valid.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fft_dist.errors import CheckpointError  # noqa: F401 - re-exported: every checkpoint failure

FORMAT_NAME = "fft-dist-checkpoint"
FORMAT_VERSION = 1

MODEL_DIR = "model"
OPTIM_DIR = "optim"
TOKENIZER_DIR = "tokenizer"
INDEX_FILE = "index.json"
TRAIN_STATE_FILE = "train_state.json"
MANIFEST_FILE = "MANIFEST.json"
LATEST_FILE = "latest"
TMP_SUFFIX = ".tmp"
PARAM_KIND = "param"
KEY_SEP = "@"

STEP_DIR_RE = re.compile(r"^step-(\d{7,})$")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied as "the tokenizer" (into a checkpoint's tokenizer/ and into an HF export)."""

# torch dtype <-> safetensors dtype tag <-> the name we write in JSON.
_DTYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.float64: ("F64", "float64"),
    torch.float32: ("F32", "float32"),
    torch.float16: ("F16", "float16"),
    torch.bfloat16: ("BF16", "bfloat16"),
    torch.int64: ("I64", "int64"),
    torch.int32: ("I32", "int32"),
    torch.int16: ("I16", "int16"),
    torch.int8: ("I8", "int8"),
    torch.uint8: ("U8", "uint8"),
    torch.bool: ("BOOL", "bool"),
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES[torch.float8_e4m3fn] = ("F8_E4M3", "float8_e4m3fn")
    _DTYPES[torch.float8_e5m2] = ("F8_E5M2", "float8_e5m2")
_BY_NAME = {name: dt for dt, (_, name) in _DTYPES.items()}




def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def parse_step(folder_name: str) -> int | None:
    m = STEP_DIR_RE.match(folder_name)
    return int(m.group(1)) if m else None


def iter_committed(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-N`` folder under a checkpoint root (intact or not), newest first.

    A symbolic link named ``step-N`` is not a checkpoint of this root: it is never read, pruned or
    replaced (deleting through it could reach whatever it points to)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir()
             if (s := parse_step(p.name)) is not None and p.is_dir() and not p.is_symlink()]
    return sorted(found, reverse=True)


def shard_file(subdir: str, rank: int, world_size: int) -> str:
    """Relative path of one rank's shard, e.g. ``model/shard-00001-of-00002.safetensors``."""
    return f"{subdir}/shard-{rank:05d}-of-{world_size:05d}.safetensors"


def tensor_key(name: str, kind: str, flat_start: int) -> str:
    return f"{name}{KEY_SEP}{kind}{KEY_SEP}{flat_start}"


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def safetensors_dtype(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype][0]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in a checkpoint") from None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype][1]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in a checkpoint") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _BY_NAME[name.removeprefix("torch.")]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; expected one of {sorted(_BY_NAME)}") from None


def read_json(path: Path, what: str | None = None) -> Any:
    """Parse a JSON file of a checkpoint, turning every failure into a CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing{f' ({what})' if what else ''}") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, an int of more than 4300 digits
        raise CheckpointError(f"{path}: unreadable{f' {what}' if what else ''}: {str(e)[:200]}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable{f' {what}' if what else ''}: nested too deeply") from None


def write_json_durable(path: Path, obj: Any, *, indent: int | None = 1) -> None:
    """Write JSON and fsync it (the caller fsyncs the folder). OS errors name the file."""
    data = json.dumps(obj, indent=indent, separators=None if indent else (",", ":")).encode("utf-8")
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(size: str | int) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20, 1000 -> 1000 (the same units as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 2GB, 500MB, 1GiB or a number of bytes")
    value, unit = float(m.group(1)), m.group(2)
    powers = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    prefix = unit.rstrip("B").rstrip("I")
    base = 1024 if "I" in unit else 1000
    return int(value * base ** powers[prefix])
