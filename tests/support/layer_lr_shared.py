"""What tests/unit/test_layer_lr.py and tests/e2e/test_layer_lr.py share: the factors each parameter should get."""
from __future__ import annotations

import torch

from fft_dist.compose import compose, resolve, to_typed

GAMMA, LAYERS = 0.5, 3


def expected(name: str, gamma: float = GAMMA, n_layers: int = LAYERS) -> float:
    if "embed_tokens" in name:
        return gamma ** (n_layers + 1)
    if ".layers." in name:
        return gamma ** (n_layers - int(name.split(".layers.")[1].split(".")[0]))
    return 1.0  # model.norm, lm_head


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def typed(*overrides: str):
    return to_typed(resolve(compose(list(overrides))))
