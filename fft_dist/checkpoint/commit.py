"""The commit phase of a save: the index, the metadata, the manifest last, the rename, ``latest``, pruning.

Rank 0 builds ``index.json`` from every rank's fragment entries (refusing fragments that do not
tile the tensors), writes ``train_state.json`` with every rank's RNG state, copies the run's
tokenizer, writes ``MANIFEST.json`` last (naming the run that owns the checkpoint) and renames
``step-N.<run id>.tmp`` to ``step-N``. Only then is ``latest`` replaced and this run's old
checkpoints pruned. The fault points ``before_index``, ``before_manifest``, ``before_rename``,
``before_latest`` and ``before_prune`` sit between those steps. Nothing here is collective:
:class:`fft_dist.checkpoint.checkpointer.Checkpointer` gathers and agrees around it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Collection

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint import ownership
from fft_dist.checkpoint.faults import fault_point
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.integrity import is_complete
from fft_dist.checkpoint.layout import write_latest
from fft_dist.checkpoint.safetensors_io import copy_durable, hash_file
from fft_dist.dist import warn0


# -- the index: every rank's fragment entries tile every tensor ---------------------------------------
def build_index(entries_per_rank: list[list[list]], world_size: int) -> dict:
    """entries: [name, kind, full_shape, dtype, start, stop, file, key] per stored fragment.

    Raises CheckpointError when ranges partly overlap, leave a gap, or disagree on shape or
    dtype, so that an inconsistent strategy can never commit a checkpoint. Identical ranges
    from several ranks (replicated state) are kept once.
    """
    tensors: dict[str, dict] = {}
    for entries in entries_per_rank:
        for name, kind, shape, dtype, start, stop, file, key in entries:
            t = tensors.setdefault(name, {"shape": None, "dtype": None, "kinds": {}})
            k = t["kinds"].setdefault(kind, {"shape": list(shape), "dtype": dtype, "ranges": []})
            if list(k["shape"]) != list(shape) or k["dtype"] != dtype:
                raise CheckpointError(
                    f"tensor {name} ({kind}): ranks disagree on its shape/dtype "
                    f"({k['shape']} {k['dtype']} vs {list(shape)} {dtype})")
            k["ranges"].append([start, stop, file, key])
    problems = []
    for name, t in tensors.items():
        for kind, k in t["kinds"].items():
            # Replicated data (e.g. a scalar 'step' that every rank holds) may be written by several
            # ranks: an exact duplicate range is harmless, so keep the lowest rank's copy.
            unique: dict[tuple[int, int], list] = {}
            for r in k["ranges"]:
                unique.setdefault((r[0], r[1]), r)
            k["ranges"] = sorted(unique.values(), key=lambda r: (r[0], r[1]))
            pos, total = 0, fmt.numel(k["shape"])
            for start, stop, file, _ in k["ranges"]:
                if start != pos:
                    what = "overlap" if start < pos else "gap"
                    problems.append(f"{name} ({kind}): {what} at flat element {min(start, pos)} ({file})")
                pos = max(pos, stop)
            if pos != total:
                problems.append(f"{name} ({kind}): stored ranges cover {pos} of {total} elements")
        param = t["kinds"].get(fmt.PARAM_KIND)
        if param is None:
            problems.append(f"{name}: optimizer state stored but no parameter fragment")
            continue
        t["shape"], t["dtype"] = param["shape"], param["dtype"]
    if problems:
        raise CheckpointError("the strategy's fragments do not tile the tensors exactly, refusing to commit:\n  "
                              + "\n  ".join(problems[:50]))
    return {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "world_size": world_size,
            "tensors": tensors}


# -- rank 0: metadata, manifest last, rename ------------------------------------------------------------
def prepare_temp(ckpt_root: Path, final: Path, tmp: Path, run_id: str) -> list[str]:
    """Rank 0: a clean, empty temporary folder for the save (a killed save's leftover of this run is
    removed first); the problems instead, e.g. an existing ``step-N``, which is never saved over."""
    problems = []
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(final):
            problems.append(already_there(final))
        else:
            ownership.remove(tmp, ownership.Reason.OWN_TEMPORARY, owner=run_id)  # a killed save's leftover
            (tmp / fmt.MODEL_DIR).mkdir(parents=True)
            (tmp / fmt.OPTIM_DIR).mkdir()
    except OSError as e:
        problems.append(f"cannot create {tmp}: {e.strerror or e}")
    return problems


def already_there(final: Path) -> str:
    what = "a symbolic link" if final.is_symlink() else ("a folder" if final.is_dir() else "a file")
    return (f"{final} already exists ({what}); fft-dist never saves over a committed checkpoint or anything "
            f"else of that name: move it away, or set checkpoint.dir to another folder")


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))


def write_and_rename(*, tmp: Path, final: Path, ckpt_root: Path, step: int, world: int, index: dict,
                     gathered: list[dict], train_state: dict, meta: dict, backend: str, run_id: str) -> None:
    """Rank 0: fsync the shard folders, write index.json, train_state.json (with `gathered`'s RNG
    states, by rank), the tokenizer copy and MANIFEST.json (last), then rename `tmp` to `final`."""
    import fft_dist

    fault_point("before_index", step)

    files: dict[str, dict] = {}
    for g in gathered:
        for rec in g["files"]:
            files[rec["path"]] = {"size": rec["size"], "sha256": rec["sha256"]}
    fmt.fsync_dir(tmp / fmt.MODEL_DIR)
    fmt.fsync_dir(tmp / fmt.OPTIM_DIR)

    fmt.write_json_durable(tmp / fmt.INDEX_FILE, index, indent=None)
    config_yaml = meta.pop("config_yaml", None)
    model_config = meta.pop("model_config", None)
    backend = meta.pop("backend", None) or backend
    tokenizer_src = meta.pop("tokenizer_dir", None)
    state = {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
        "fft_dist_version": getattr(fft_dist, "__version__", "unknown"), "torch_version": torch.__version__,
        "step": step, "world_size": world, "backend": backend, "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "train_state": _jsonable(train_state),
        "rng": [g["rng"] for g in gathered],  # indexed by rank
        "config_yaml": config_yaml, "model_config": _jsonable(model_config), "meta": _jsonable(meta),
    }
    fmt.write_json_durable(tmp / fmt.TRAIN_STATE_FILE, state)
    if tokenizer_src and Path(tokenizer_src).is_dir():  # the run's own tokenizer, named by the trainer
        present = [f for f in fmt.TOKENIZER_FILES if (Path(tokenizer_src) / f).is_file()]
        if present:
            (tmp / fmt.TOKENIZER_DIR).mkdir()
            for f in present:
                copy_durable(Path(tokenizer_src) / f, tmp / fmt.TOKENIZER_DIR / f)
                size, digest = hash_file(tmp / fmt.TOKENIZER_DIR / f)
                files[f"{fmt.TOKENIZER_DIR}/{f}"] = {"size": size, "sha256": digest}
            fmt.fsync_dir(tmp / fmt.TOKENIZER_DIR)
    for f in (fmt.INDEX_FILE, fmt.TRAIN_STATE_FILE):
        size, digest = hash_file(tmp / f)
        files[f] = {"size": size, "sha256": digest}
    fault_point("before_manifest", step)
    manifest = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "step": step,
                "world_size": world, "run_id": run_id, "created": state["created"],
                "files": dict(sorted(files.items()))}
    fmt.write_json_durable(tmp / fmt.MANIFEST_FILE, manifest)
    fmt.fsync_dir(tmp)
    fault_point("before_rename", step)
    if os.path.lexists(final):  # appeared since step 1 (the checkpoint.dir lock makes this a user's doing)
        raise CheckpointError(already_there(final))
    os.rename(tmp, final)
    fmt.fsync_dir(ckpt_root)


def after_commit(ckpt_root: Path, final: Path, *, step: int, keep_last: int, protect: set[str], run_id: str) -> None:
    """Point ``latest`` at the new checkpoint and prune. The checkpoint is committed already, so a
    failure here is a warning: ``resume=auto`` finds the newest intact checkpoint without ``latest``."""
    fault_point("before_latest", step)
    try:
        write_latest(ckpt_root, final.name, owner=run_id)
    except CheckpointError as e:
        warn0(f"{final.name} is committed, but {e}; resume=auto still finds it (it picks the newest intact "
              f"checkpoint)")
    fault_point("before_prune", step)
    try:
        prune(ckpt_root, keep_last=keep_last, keep=final.name, protect=protect, run_id=run_id)
    except (OSError, CheckpointError) as e:  # the new checkpoint is committed; a failed clean-up must not fail the run
        warn0(f"pruning {ckpt_root} failed after saving {final.name}: {e}")


def prune(ckpt_root: Path, *, keep_last: int, keep: str, run_id: str, protect: Collection[str] = ()) -> list[str]:
    """Keep `keep` plus this run's newest ``keep_last - 1`` other *intact* checkpoints; delete this run's
    older intact ones unless named in `protect`. Never touches a damaged checkpoint (it does not count
    as kept either), another run's checkpoint (no manifest naming `run_id`: e.g. one copied in to
    resume from), or anything that is not a checkpoint. Also removes this run's leftovers of killed
    saves (temporaries whose name carries `run_id`). Every delete goes through
    :func:`fft_dist.checkpoint.ownership.remove`."""
    removed = []
    ours = [p.name for _, p in fmt.iter_committed(ckpt_root)
            if p.name != keep and ownership.manifest_run_id(p) == run_id and is_complete(p)]
    doomed = [n for n in ours[max(keep_last - 1, 0):] if n not in protect]
    for n in doomed:
        ownership.remove(ckpt_root / n, ownership.Reason.OWN_CHECKPOINT, owner=run_id)
        removed.append(n)
    if doomed:
        fmt.fsync_dir(ckpt_root)
    for p in ckpt_root.iterdir():
        if ownership.temp_owner(p.name) == run_id:
            ownership.remove(p, ownership.Reason.OWN_TEMPORARY, owner=run_id)
    return removed
