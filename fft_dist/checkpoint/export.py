"""Export a checkpoint to a standard Hugging Face folder, streaming one tensor at a time."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint import ownership
from fft_dist.checkpoint.faults import check_fault_env, fault_point
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.integrity import verify_checkpoint
from fft_dist.checkpoint.interpolate import BaseMix, InterpolationUsageError, base_hint, check_alpha
from fft_dist.checkpoint.layout import resolve_checkpoint
from fft_dist.checkpoint.reader import CheckpointReader, read_train_state
from fft_dist.checkpoint.safetensors_io import write_safetensors_lazy
from fft_dist.checkpoint.schema import read_manifest
from fft_dist.models.conversions import ExportGroup, meta_model, plan_export, revert
from fft_dist.processes import process_token

WEIGHTS_INDEX = "model.safetensors.index.json"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, in model order, like transformers: a tensor larger than the limit gets its own shard."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _hf_config(model_config: dict, dtype: str):
    from transformers import AutoConfig

    from fft_dist.model import SEQUENCE_CLASSIFICATION, model_task, task_architecture

    cfg = dict(model_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise CheckpointError("the checkpoint's model config has no model_type")
    for k in ("transformers_version", "_name_or_path", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    config = AutoConfig.for_model(model_type, **cfg)
    task = model_task(config)
    if not getattr(config, "architectures", None) or task == SEQUENCE_CLASSIFICATION:
        arch = task_architecture(model_type, task)  # the class the Auto* loader of this task picks
        if arch:
            config.architectures = [arch]
    config.use_cache = True  # training turns the KV cache off; generation wants it back
    config.dtype = dtype
    return config


def _is_classifier(config) -> bool:
    from fft_dist.model import SEQUENCE_CLASSIFICATION, model_task

    return model_task(config) == SEQUENCE_CLASSIFICATION


def _copy_tokenizer(src: Path, out_dir: Path, names: list[str] | tuple[str, ...]) -> list[str]:
    copied = []
    for f in names:
        if (src / f).is_file():
            shutil.copyfile(src / f, out_dir / f)
            copied.append(f)
    return copied


class ExportTargetError(ValueError):
    """The output folder exists and is not empty (a usage error: pass overwrite=True / --force)."""


def _check_target(out_dir: Path, overwrite: bool, run_id: str | None) -> None:
    if os.path.lexists(out_dir) and (out_dir.is_symlink() or not out_dir.is_dir()):
        raise ExportTargetError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        if run_id is not None and ownership.proves(out_dir, ownership.Reason.OWN_EXPORT, run_id):
            return  # this run's earlier export (a resumed run exports again)
        raise ExportTargetError(f"{out_dir}: not empty{' and not written by this run' if run_id else ''}; refusing "
                                f"to write into it (pass --force / overwrite=True to replace it as a whole)")


def _swap_in(new: Path, target: Path, *, owner: str) -> None:
    """Put the finished folder `new` at `target`; an existing `target` is replaced (and deleted).

    Linux: renameat2(RENAME_EXCHANGE) swaps the two atomically, so `target` is always either
    the old folder or the complete new one. Elsewhere: two renames (a crash between them
    leaves both folders next to each other, never a half-written one at `target`). The old
    folder ends up under a temporary name that carries `owner`, which is what allows its removal.
    """
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(new, target)  # rename(2) replaces an empty folder atomically
        return
    if not _exchange(new, target):
        old = new.with_name(ownership.temp_name(f".{target.name}.replaced", owner))
        os.rename(target, old)
        os.rename(new, target)
        new = old
    ownership.remove(new, ownership.Reason.OWN_TEMPORARY, owner=owner)


def _remove_stale_partials(out_dir: Path) -> None:
    """Leftovers of exports into `out_dir` that were killed (their process is gone): removed."""
    prefix = f".{out_dir.name}.partial."
    for p in out_dir.parent.iterdir() if out_dir.parent.is_dir() else []:
        if p.name.startswith(prefix) and ownership.proves(p, ownership.Reason.STALE_TEMPORARY, None):
            ownership.remove(p, ownership.Reason.STALE_TEMPORARY, owner=ownership.temp_owner(p.name))
            print(f"fft-dist: removed {p}, the leftover of a killed export", file=sys.stderr, flush=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def export_hf(checkpoint: Path, out_dir: Path, *, dtype: str = "float32", max_shard_size: str | int = "2GB",
              tokenizer_dir: Path | None = None, verify: bool = True, model_config: dict | None = None,
              overwrite: bool = False, run_id: str | None = None, interpolate_base: float | None = None,
              base: Path | None = None) -> dict:
    """Write `checkpoint` as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads
    (a classifier: ``AutoModelForSequenceClassification``, with its label names and pad_token_id).

    Single process. `checkpoint`: a step-N folder, a checkpoint root or its ``latest``. Output:
    config.json (from the model config stored at save time, or `model_config`),
    generation_config.json (saved in the checkpoint's ``meta``, else from `tokenizer_dir`, else
    derived from the config), the tokenizer files (from `tokenizer_dir`, else the checkpoint's own
    verified tokenizer/ copy; never from a path recorded in the checkpoint's metadata, which is
    not trusted to point outside it), ``model-0000k-of-0000n.safetensors``
    split at `max_shard_size`, and ``model.safetensors.index.json``. The keys and shapes are the ones
    ``save_pretrained`` writes for the same model, as transformers says on a meta-device model
    (:func:`~fft_dist.models.conversions.plan_export`): tied parameters (the output embedding with
    ``tie_word_embeddings``) are left out, and fused tensors are reverted to their saved layout (an
    MoE's ``mlp.experts.gate_up_proj`` to one gate and one up tensor per expert). Tensors are assembled
    from their stored ranges and written one at a time, so peak memory is about one tensor and what
    its reversion makes of it (a fused expert tensor: about twice its size in the export dtype).

    Everything is written into a temporary sibling folder (named for this process) that replaces
    `out_dir` only when complete, so a failed or killed export never leaves a half-written
    `out_dir`; what a killed export left is removed by the next export into the same folder. The
    folder gets a marker (:data:`~fft_dist.checkpoint.ownership.EXPORT_MARKER`) naming `run_id`,
    the run it belongs to. A non-empty `out_dir` is refused (:class:`ExportTargetError`) unless
    `overwrite`, or its marker names `run_id` (a resumed run replaces its own export). Bad
    `dtype` or `max_shard_size`: ValueError; a bad checkpoint: CheckpointError.
    `interpolate_base` (alpha in [0, 1]) writes (1 - alpha) * theta + alpha * theta_0, theta_0 read tensor by
    tensor from the Hugging Face folder `base` (:mod:`fft_dist.checkpoint.interpolate`); no `base`:
    InterpolationUsageError naming what to pass.
    Returns a summary dict (files, shards, bytes, tokenizer files).
    """
    out_dir = Path(os.path.abspath(out_dir))
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: choose one of {sorted(EXPORT_DTYPES)}")
    max_bytes = fmt.parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"max_shard_size {max_shard_size!r}: must be more than 0 bytes")
    if interpolate_base is not None:
        check_alpha(interpolate_base)
    _check_target(out_dir, overwrite, run_id)
    check_fault_env()
    checkpoint = resolve_checkpoint(checkpoint)
    if interpolate_base is not None and base is None:
        raise InterpolationUsageError(f"--interpolate-base needs the weights the run started from: "
                                f"{base_hint(read_train_state(checkpoint))}")
    problems = verify_checkpoint(checkpoint, checksums=verify)
    if problems:
        raise CheckpointError(f"cannot export {checkpoint}:\n  " + "\n  ".join(problems))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    token = process_token()
    tmp = out_dir.with_name(ownership.temp_name(f".{out_dir.name}.partial", token))
    tmp.mkdir()
    try:
        summary = _write_export(checkpoint, tmp, dtype=dtype, max_bytes=max_bytes, tokenizer_dir=tokenizer_dir,
                                model_config=model_config,
                                mix=(interpolate_base, base) if interpolate_base is not None else None)
        ownership.write_export_marker(tmp, run_id=run_id, step=read_train_state(checkpoint)["step"])
        _check_target(out_dir, overwrite, run_id)  # something may have appeared there meanwhile
        _swap_in(tmp, out_dir, owner=token)
    except BaseException:
        if tmp.is_dir():
            ownership.remove(tmp, ownership.Reason.OWN_TEMPORARY, owner=token)
        raise
    return dict(summary, out_dir=str(out_dir))


def _write_export(checkpoint: Path, out_dir: Path, *, dtype: str, max_bytes: int, tokenizer_dir: Path | None,
                  model_config: dict | None, mix: tuple[float, Path] | None = None) -> dict:
    out_dtype = EXPORT_DTYPES[dtype]
    state = read_train_state(checkpoint)
    model_config = model_config or state.get("model_config")
    if not model_config:
        raise CheckpointError(f"{checkpoint / fmt.TRAIN_STATE_FILE}: has no model_config; pass model_config=")
    try:
        config = _hf_config(model_config, dtype)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise CheckpointError(f"{checkpoint / fmt.TRAIN_STATE_FILE}: model_config is not a usable Hugging Face "
                              f"config: {type(e).__name__}: {e}") from None
    reader = CheckpointReader(checkpoint)
    names = [n for n in reader.names() if reader.has(n, fmt.PARAM_KIND)]
    try:
        model = meta_model(config)
        groups = plan_export(model, {n: reader.shape(n) for n in names})
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a config it cannot build
        raise CheckpointError(f"{checkpoint / fmt.TRAIN_STATE_FILE}: cannot build the model its model_config "
                              f"describes: {type(e).__name__}: {e}") from None
    elem = torch.empty(0, dtype=out_dtype).element_size()
    shapes = {key: shape for g in groups for key, shape in g.outputs.items()}
    sizes = [(key, fmt.numel(shape) * elem) for key, shape in shapes.items()]
    shards = _plan_shards(sizes, max_bytes)
    base_mix = BaseMix(mix[1], mix[0], model) if mix else None
    produce_key = _Reverted(reader, model, groups, out_dtype, base_mix)

    weight_map: dict[str, str] = {}
    files = []
    n = len(shards)
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        specs = [(key, shapes[key], out_dtype) for key in shard]
        write_safetensors_lazy(out_dir / fname, specs, lambda i, shard=shard: produce_key(shard[i]),
                               metadata={"format": "pt"}, digest=False)
        weight_map.update(dict.fromkeys(shard, fname))
        files.append(fname)
        fault_point("mid_export")
    reader.close()
    if base_mix is not None:
        base_mix.close()
    total = sum(s for _, s in sizes)
    with open(out_dir / WEIGHTS_INDEX, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total, "total_parameters": total // elem}, "weight_map": weight_map},
                  f, indent=2)
    config.save_pretrained(out_dir)
    files.append("config.json")

    # a classifier has nothing to generate
    if not _is_classifier(config) and _write_generation_config(config, state, tokenizer_dir, out_dir):
        files.append("generation_config.json")

    tok_files = _copy_tokenizer(Path(tokenizer_dir), out_dir, fmt.TOKENIZER_FILES) if tokenizer_dir else []
    if not tok_files:
        tok_files = _copy_tokenizer(checkpoint / fmt.TOKENIZER_DIR, out_dir, _own_tokenizer_files(checkpoint))
    files += tok_files
    return {"shards": n, "bytes": total, "tensors": len(shapes), "dtype": dtype,
            "files": files, "tokenizer_files": tok_files}


class _Reverted:
    """The export's tensors, key by key, in the plan's order: each group of checkpoint tensors is read whole,
    cast, reverted by transformers (:func:`fft_dist.models.conversions.revert`) and kept until its last key is
    written, so memory holds one group at a time (a fused expert tensor and its per-expert pieces)."""

    def __init__(self, reader: CheckpointReader, model, groups: list[ExportGroup], dtype: torch.dtype,
                 mix: BaseMix | None = None):
        self._reader, self._model, self._dtype, self._mix = reader, model, dtype, mix
        self._group_of = {key: g for g in groups for key in g.outputs}
        self._pending: dict[str, torch.Tensor] = {}

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self._pending:
            group = self._group_of[key]
            self._pending = {}
            mix = self._mix or (lambda _name, value: value)
            values = {n: mix(n, self._reader.read_full(n)).to(self._dtype) for n in group.names}
            self._reader.close()  # unmap: safetensors reads through mmap, and mapped pages count as RSS
            out = revert(self._model, values)
            del values
            got = {k: tuple(t.shape) for k, t in out.items()}
            if got != group.outputs:
                raise CheckpointError(f"export: reverting {group.names} gave {got}, planned {group.outputs}")
            self._pending = out
        return self._pending.pop(key).contiguous()


def _own_tokenizer_files(checkpoint: Path) -> list[str]:
    """The tokenizer files of the checkpoint's own ``tokenizer/`` copy that its manifest lists (so they
    were checked) and that are plain files inside the folder (a link would copy a file from elsewhere)."""
    listed = read_manifest(checkpoint)["files"]
    inside = checkpoint.resolve()
    own = []
    for f in fmt.TOKENIZER_FILES:
        path = checkpoint / fmt.TOKENIZER_DIR / f
        if f"{fmt.TOKENIZER_DIR}/{f}" in listed and path.resolve().parent == inside / fmt.TOKENIZER_DIR \
                and not path.is_symlink():
            own.append(f)
    return own


def _write_generation_config(config, state: dict, tokenizer_dir: Path | None, out_dir: Path) -> bool:
    """generation_config.json: the model folder's own, stored at save time in ``meta.generation_config``
    (written as it was: transformers refuses to re-save many real ones), else the one in an explicitly
    given `tokenizer_dir`, else one derived from `config`; False when there is none. A folder named in
    the checkpoint's metadata is never read: the metadata is not trusted to point outside the checkpoint."""
    from transformers import GenerationConfig

    saved = state["meta"].get("generation_config")
    if saved is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        return True
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(tokenizer_dir))
    else:
        try:
            gen = GenerationConfig.from_model_config(config)
        except Exception:  # noqa: BLE001 - a config without generation fields: skip the file
            return False
    gen.save_pretrained(out_dir)
    return True
