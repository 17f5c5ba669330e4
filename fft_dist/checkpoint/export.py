"""Export a checkpoint to a standard Hugging Face folder, streaming one tensor at a time."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.reader import CheckpointReader, read_train_state, verify_checkpoint
from fft_dist.checkpoint.writer import write_safetensors_lazy

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
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = dict(model_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise CheckpointError("the checkpoint's model config has no model_type")
    for k in ("transformers_version", "_name_or_path", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    config = AutoConfig.for_model(model_type, **cfg)
    if not getattr(config, "architectures", None):
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if arch:
            config.architectures = [arch]
    config.use_cache = True  # training turns the KV cache off; generation wants it back
    config.dtype = dtype
    return config


def _copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    copied = []
    for f in fmt.TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out_dir / f)
            copied.append(f)
    return copied


def export_hf(checkpoint: Path, out_dir: Path, *, dtype: str = "float32", max_shard_size: str | int = "2GB",
              tokenizer_dir: Path | None = None, verify: bool = True, model_config: dict | None = None) -> dict:
    """Write `checkpoint` as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Single process. Output: config.json (from the model config stored at save time, or
    `model_config`), generation_config.json, the tokenizer files (from `tokenizer_dir`, else
    the checkpoint's own tokenizer/ copy, else the folder recorded at save time),
    ``model-0000k-of-0000n.safetensors`` split at `max_shard_size`, and
    ``model.safetensors.index.json``. Tensors are assembled from their stored ranges and written
    one at a time, so peak memory is about one tensor (at most one output shard). With
    ``tie_word_embeddings`` the output embedding is not written: it stays tied to the input one.
    Returns a summary dict (files, shards, bytes, tokenizer files).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"export dtype {dtype!r}: choose one of {sorted(EXPORT_DTYPES)}")
    out_dtype = EXPORT_DTYPES[dtype]
    max_bytes = fmt.parse_size(max_shard_size)
    problems = verify_checkpoint(checkpoint, checksums=verify)
    if problems:
        raise CheckpointError(f"cannot export {checkpoint}:\n  " + "\n  ".join(problems))
    state = read_train_state(checkpoint)
    model_config = model_config or state.get("model_config")
    if not model_config:
        raise CheckpointError(f"{checkpoint / fmt.TRAIN_STATE_FILE}: has no model_config; pass model_config=")
    config = _hf_config(model_config, dtype)
    reader = CheckpointReader(checkpoint)
    names = [n for n in reader.names() if reader.has(n, fmt.PARAM_KIND)]
    if getattr(config, "tie_word_embeddings", False):
        tied_out = {"lm_head.weight", "embed_out.weight"}
        names = [n for n in names if n not in tied_out]
    elem = torch.empty(0, dtype=out_dtype).element_size()
    sizes = [(n, fmt.numel(reader.shape(n)) * elem) for n in names]
    shards = _plan_shards(sizes, max_bytes)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / WEIGHTS_INDEX]:
        if stale.is_file():
            stale.unlink()
    weight_map: dict[str, str] = {}
    files = []
    n = len(shards)
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        specs = [(name, reader.shape(name), out_dtype) for name in shard]

        def produce(i: int, shard=shard) -> torch.Tensor:
            t = reader.read_full(shard[i]).to(out_dtype)
            reader.close()  # unmap: safetensors reads through mmap, and mapped pages count as RSS
            return t

        write_safetensors_lazy(out_dir / fname, specs, produce, metadata={"format": "pt"}, digest=False)
        weight_map.update(dict.fromkeys(shard, fname))
        files.append(fname)
    reader.close()
    total = sum(s for _, s in sizes)
    with open(out_dir / WEIGHTS_INDEX, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total, "total_parameters": total // elem}, "weight_map": weight_map},
                  f, indent=2)
    config.save_pretrained(out_dir)
    files.append("config.json")

    gen = _generation_config(config, state, tokenizer_dir)
    if gen is not None:
        gen.save_pretrained(out_dir)
        files.append("generation_config.json")

    tok_files: list[str] = []
    candidates = [tokenizer_dir, checkpoint / fmt.TOKENIZER_DIR, (state.get("meta") or {}).get("tokenizer_dir")]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            tok_files = _copy_tokenizer(Path(cand), out_dir)
            if tok_files:
                break
    files += tok_files
    return {"out_dir": str(out_dir), "shards": n, "bytes": total, "tensors": len(names), "dtype": dtype,
            "files": files, "tokenizer_files": tok_files}


def _generation_config(config, state: dict, tokenizer_dir: Path | None):
    """The model folder's own generation_config.json when known, else one derived from config."""
    from transformers import GenerationConfig

    meta = state.get("meta") or {}
    if isinstance(meta.get("generation_config"), dict):
        return GenerationConfig.from_dict(meta["generation_config"])
    for folder in (meta.get("model_path"), tokenizer_dir, meta.get("tokenizer_dir")):
        if folder and (Path(folder) / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(str(folder))
    try:
        return GenerationConfig.from_model_config(config)
    except Exception:  # noqa: BLE001 - a config without generation fields: skip the file
        return None

