"""Helpers and fixtures moved unchanged from tests/test_model_families.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_model_families.py,
unit/test_model_families.py."""
from __future__ import annotations


SMALL = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def config_of(family: str):
    from transformers import (Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, Olmo2Config, Phi3Config,
                              Qwen3Config)

    classes = {"llama": LlamaConfig, "qwen3": Qwen3Config, "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig,
               "phi3": Phi3Config, "olmo2": Olmo2Config, "gpt_neox": GPTNeoXConfig}
    extra = {"gemma2": dict(head_dim=16), "gemma3_text": dict(head_dim=16), "qwen3": dict(head_dim=16),
             "phi3": dict(pad_token_id=0)}
    return classes[family](**SMALL, **extra.get(family, {}))
