"""Helpers and fixtures moved unchanged from tests/test_checkpoint.py when the tests were split into unit/ and e2e/
(issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_checkpoint.py,
unit/test_checkpoint.py."""
from __future__ import annotations

import json
from pathlib import Path
from checkpoint_worker import FlatShardStrategy, llama_shapes

import pytest

from helpers import REPO


TOKENIZER = REPO / "fft_dist" / "assets" / "tokenizer"


LLAMA = dict(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # 97 rows: not divisible by 2 or 3


def make_spec(path: Path, *, tie: bool) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**LLAMA, tie_word_embeddings=tie)
    shapes = llama_shapes(cfg)
    path.write_text(json.dumps({"tensors": [[n, list(s)] for n, s in shapes.items()],
                                "model_config": cfg.to_dict(), "tokenizer_dir": str(TOKENIZER)}))
    return path


def shapes_of(spec: Path) -> dict[str, tuple[int, ...]]:
    return {n: tuple(s) for n, s in json.loads(spec.read_text())["tensors"]}


def reference(spec: Path, steps: int) -> FlatShardStrategy:
    """Uninterrupted single-process run of the test strategy."""
    ref = FlatShardStrategy(shapes_of(spec), split="rows", rank=0, world=1)
    for s in range(steps):
        ref.train_step(s)
    return ref


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    return make_spec(tmp_path_factory.mktemp("spec") / "spec.json", tie=False)
