"""Collective, crash-safe save: every rank streams its own fragments into its own safetensors files.

Why not ``torch.distributed.checkpoint`` (DCP) with ``HuggingFaceStorageWriter``: see
:func:`save_checkpoint`'s docstring and the package docstring.
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
from fft_dist.checkpoint.collective import agree_or_raise
from fft_dist.checkpoint.faults import check_fault_env, fault_point
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.integrity import is_complete
from fft_dist.checkpoint.layout import write_latest
from fft_dist.checkpoint.rng import capture_rng
from fft_dist.checkpoint.safetensors_io import copy_durable, hash_file, write_safetensors
from fft_dist.dist import all_gather_small, rank_world, warn0

LAST_SAVE_TIMINGS: dict[str, float] = {}
"""Seconds per phase of this process's last save (shards, gather, commit, total); for benchmarks."""

_FINITE_CHUNK = 1 << 20  # elements per isfinite() call: its temporaries (a bool and a float copy) stay ~5 MB


# -- building the index from every rank's fragment metadata ----------------------------------
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


# -- the collective save ------------------------------------------------------------------------------
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


def _write_rank_shards(strategy, tmp: Path, rank: int, world: int, step: int) -> tuple[list[list], list[dict]]:
    model_items: list[tuple[str, torch.Tensor]] = []
    optim_items: list[tuple[str, torch.Tensor]] = []
    entries: list[list] = []
    model_file = fmt.shard_file(fmt.MODEL_DIR, rank, world)
    optim_file = fmt.shard_file(fmt.OPTIM_DIR, rank, world)
    seen: set[str] = set()
    for frag in strategy.fragments():
        local = frag.local.detach()
        if local.dim() != 1:
            local = local.reshape(-1)
        total = fmt.numel(frag.full_shape)
        start = int(frag.flat_start)
        stop = min(start + local.numel(), total)  # ZeRO-3's last partition may carry padding
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
        file = model_file if is_param else optim_file
        (model_items if is_param else optim_items).append((key, local))
        entries.append([frag.name, frag.kind, [int(d) for d in frag.full_shape], fmt.dtype_name(local.dtype),
                        start, stop, file, key])
    meta = {"format": "pt", "fft_dist_format": str(fmt.FORMAT_VERSION), "rank": str(rank),
            "world_size": str(world), "step": str(step)}
    records = []
    mid = len(model_items) // 2

    def model_hook(i: int) -> None:
        if i == mid:
            fault_point("mid_model_shard", step)

    records.append(write_safetensors(tmp / model_file, model_items, metadata=meta, rel=model_file,
                                     on_tensor=model_hook))
    fault_point("after_model_shards", step)
    records.append(write_safetensors(tmp / optim_file, optim_items, metadata=meta, rel=optim_file))
    fault_point("after_optim_shards", step)
    return entries, [r.__dict__ for r in records]


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"


def save_checkpoint(strategy, *, ckpt_root: Path, step: int, train_state: dict, keep_last: int, run_id: str,
                    meta: dict | None = None, protect: Collection[str] = ()) -> Path:
    """Write a complete checkpoint of `strategy` at `step` and commit it atomically. Collective.

    Every rank writes ``model/`` and ``optim/`` shards of the fragments it owns (no rank ever
    holds more than its own state; fragments are written straight from their storage). Rank 0
    writes index.json (built from every rank's small fragment metadata), train_state.json (with
    every rank's RNG state), an optional tokenizer copy, and MANIFEST.json last (naming `run_id`,
    the run that owns the checkpoint). Then it renames ``step-N.<run_id>.tmp`` to ``step-N``,
    points ``latest`` at it and prunes this run's checkpoints to ``keep_last`` intact ones, never
    one named in `protect` (e.g. the best-eval one), a damaged one, or another run's.

    Refused, on every rank, with nothing committed and the temporary folder removed: an existing
    ``step-N`` (a committed checkpoint is never saved over), any parameter or optimizer-state
    fragment holding NaN/inf (the error names the tensor and kind), a strategy whose fragments
    do not tile the tensors, and any write error (the error names the file).

    I/O engine: our own streaming safetensors writer, not DCP's ``HuggingFaceStorageWriter``.
    DCP names files ``shard-0000r-model-0000k-of-0000n.safetensors`` in one folder (not
    model/ + optim/ per rank), keeps its own offset metadata in the safetensors header rather
    than our index, would make us describe our uneven 1-D ranges as ShardedTensor/DTensor
    chunks for its planner, pickles plans through gather_object, and writes files without a
    checksum, so every byte would have to be read back to hash it. Writing 1-D ranges is
    trivially simple with the safetensors layout, and hashing while writing saves the extra
    pass over the data. Every file we write is an ordinary safetensors file that ``safe_open``
    reads.
    """
    check_fault_env()
    ckpt_root = Path(ckpt_root)
    rank, world = rank_world()
    name = fmt.step_dir_name(step)
    tmp = ckpt_root / ownership.temp_name(name, run_id)
    try:
        return _save(strategy, ckpt_root=ckpt_root, step=step, train_state=train_state, keep_last=keep_last,
                     meta=dict(meta or {}), protect=set(protect), rank=rank, world=world, tmp=tmp, run_id=run_id)
    except BaseException:
        # Every error above is agreed by all ranks first, so no rank is still writing into tmp.
        if rank == 0 and tmp.is_dir():
            ownership.remove(tmp, ownership.Reason.OWN_TEMPORARY, owner=run_id)
        raise


def _save(strategy, *, ckpt_root: Path, step: int, train_state: dict, keep_last: int, meta: dict,
          protect: set[str], rank: int, world: int, tmp: Path, run_id: str) -> Path:
    name = fmt.step_dir_name(step)
    final = ckpt_root / name
    head = f"saving {final} failed (nothing was committed; {tmp.name} removed):"
    t0 = time.perf_counter()

    # 1. a clean temp folder (rank 0), seen by everyone
    problems = []
    if rank == 0:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(final):
                problems.append(_already_there(final))
            else:
                ownership.remove(tmp, ownership.Reason.OWN_TEMPORARY, owner=run_id)  # a killed save's leftover
                (tmp / fmt.MODEL_DIR).mkdir(parents=True)
                (tmp / fmt.OPTIM_DIR).mkdir()
        except OSError as e:
            problems.append(f"cannot create {tmp}: {e.strerror or e}")
    agree_or_raise(problems, head)

    # 2. every rank writes its own shards (errors are shared so that no rank waits forever)
    t_setup = time.perf_counter()
    mine: dict[str, Any] = {"rank": rank, "rng": capture_rng()}
    problems = []
    try:
        mine["entries"], mine["files"] = _write_rank_shards(strategy, tmp, rank, world, step)
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        problems.append(f"rank {rank}: {_describe(e)}")
    agree_or_raise(problems, head)
    t_shards = time.perf_counter()
    gathered = all_gather_small(mine)
    t_gather = time.perf_counter()
    # every rank builds the same index, so a bad tiling raises everywhere at once
    index = build_index([g["entries"] for g in gathered], world)

    # 3. rank 0: metadata files, manifest last, commit
    problems = []
    if rank == 0:
        try:
            fault_point("before_index", step)
            _commit(tmp=tmp, final=final, ckpt_root=ckpt_root, step=step, world=world, index=index,
                    gathered=gathered, train_state=train_state, meta=meta, strategy=strategy, run_id=run_id)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            problems.append(_describe(e))
    agree_or_raise(problems, head)
    if rank == 0:
        _after_commit(ckpt_root, final, step=step, keep_last=keep_last, protect=protect, run_id=run_id)
    t_end = time.perf_counter()
    LAST_SAVE_TIMINGS.clear()
    LAST_SAVE_TIMINGS.update(setup=t_setup - t0, shards=t_shards - t_setup, gather=t_gather - t_shards,
                             commit=t_end - t_gather, total=t_end - t0)
    if rank == 0 and os.environ.get("FFT_DIST_CKPT_VERBOSE"):
        print(f"fft-dist: saved {final} in {time.perf_counter() - t0:.2f} s", flush=True)
    return final


def _already_there(final: Path) -> str:
    what = "a symbolic link" if final.is_symlink() else ("a folder" if final.is_dir() else "a file")
    return (f"{final} already exists ({what}); fft-dist never saves over a committed checkpoint or anything "
            f"else of that name: move it away, or set checkpoint.dir to another folder")


def _after_commit(ckpt_root: Path, final: Path, *, step: int, keep_last: int, protect: set[str], run_id: str) -> None:
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


def _commit(*, tmp: Path, final: Path, ckpt_root: Path, step: int, world: int, index: dict, gathered: list[dict],
            train_state: dict, meta: dict, strategy, run_id: str) -> None:
    import fft_dist

    files: dict[str, dict] = {}
    for g in gathered:
        for rec in g["files"]:
            files[rec["path"]] = {"size": rec["size"], "sha256": rec["sha256"]}
    fmt.fsync_dir(tmp / fmt.MODEL_DIR)
    fmt.fsync_dir(tmp / fmt.OPTIM_DIR)

    fmt.write_json_durable(tmp / fmt.INDEX_FILE, index, indent=None)
    config_yaml = meta.pop("config_yaml", None)
    model_config = meta.pop("model_config", None)
    backend = meta.pop("backend", None) or getattr(strategy, "name", "unknown")
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
        raise CheckpointError(_already_there(final))
    os.rename(tmp, final)
    fmt.fsync_dir(ckpt_root)


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
