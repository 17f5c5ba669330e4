"""Helpers and fixtures moved unchanged from tests/test_moe_checkpoints.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by
e2e/test_moe_checkpoints.py, unit/test_moe_checkpoints.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import REPO


TOKENIZER = REPO / "fft_dist" / "assets" / "tokenizer"


COMMON = dict(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)


FAMILIES = {
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, head_dim=16),
    "mixtral": dict(model_type="mixtral", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_tied": dict(model_type="qwen2", intermediate_size=128, tie_word_embeddings=True),
}


def save_folder(folder: Path, family: str, seed: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **COMMON, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # clearly not a fresh init: routers and norms too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, family in enumerate(FAMILIES):
        out[family] = root / family
        save_folder(out[family], family, seed=10 + i)
    return out
