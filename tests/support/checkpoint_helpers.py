"""Helpers for the checkpoint reliability tests: tiny single-process checkpoints and ways to damage them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from checkpoint_worker import FlatShardStrategy

from fft_dist import checkpoint as ckpt

RUN = "0123456789abcdef"
"""The run id the tests' checkpoints belong to (a run's id marks what it may prune)."""
SHAPES = {"model.a.weight": (13, 8), "model.b.weight": (7,), "model.c.weight": (5, 3)}
TINY_LLAMA = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32)


def strategy(shapes: dict | None = None, *, steps: int = 1, seed: int = 0) -> FlatShardStrategy:
    s = FlatShardStrategy(dict(shapes or SHAPES), split="rows", rank=0, world=1, seed=seed)
    for k in range(steps):
        s.train_step(k)
    return s


def save(root: Path, step: int, *, s: FlatShardStrategy | None = None, keep_last: int = 5, protect=(),
         meta: dict | None = None, run_id: str = RUN) -> Path:
    s = s or strategy(steps=1)
    return ckpt.save_checkpoint(s, ckpt_root=root, step=step, train_state={"step": step}, keep_last=keep_last,
                                meta=dict(meta or {"backend": "flatshard-rows"}), protect=protect, run_id=run_id)


def llama_checkpoint(root: Path, step: int = 1) -> Path:
    """A tiny Llama-shaped checkpoint with a model config, so that it can be exported."""
    from transformers import LlamaConfig

    from checkpoint_worker import llama_shapes

    cfg = LlamaConfig(**TINY_LLAMA)
    s = strategy(llama_shapes(cfg), steps=1)
    return save(root, step, s=s, meta={"model_config": cfg.to_dict(), "backend": "flatshard-rows"})


def truncate(path: Path, nbytes: int = 50) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - nbytes)


def rewrite(folder: Path, rel: str, text: str | bytes, *, fix_manifest: bool = True) -> None:
    """Replace one file of a checkpoint and (by default) make the manifest agree with it, so that only
    the structural checks can catch the change."""
    data = text.encode() if isinstance(text, str) else text
    (folder / rel).write_bytes(data)
    if fix_manifest:
        mpath = folder / "MANIFEST.json"
        manifest = json.loads(mpath.read_text())
        manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        mpath.write_text(json.dumps(manifest))


def edit_json(folder: Path, rel: str, mutate, *, fix_manifest: bool = True) -> None:
    obj = json.loads((folder / rel).read_text())
    obj = mutate(obj) or obj
    rewrite(folder, rel, json.dumps(obj), fix_manifest=fix_manifest)
