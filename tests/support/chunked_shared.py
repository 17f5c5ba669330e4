"""What tests/unit/test_chunked_loss.py and the distillation tests share: tiny models of five families with
their head rules set so that they change the loss, and one batch with padding and a prompt without loss."""
from __future__ import annotations

import torch

from families import BY_NAME

# the head rule at a value that changes a tiny random model's loss (the defaults barely touch logits of order 0.1)
RULES = {"llama": {}, "qwen2": {}, "gemma2": {"final_logit_softcapping": 0.5}, "granite": {"logits_scaling": 0.25},
         "cohere": {"logit_scale": 4.0}}
NOT_IN_FAMILIES = {"granite": "GraniteConfig", "cohere": "CohereConfig"}
"""Families with no row in tests/support/families.py (the conformance suite does not train them): built from
the Llama row's sizes with their own config class."""


def tiny_model(family: str):
    import transformers
    from transformers import AutoModelForCausalLM

    if family in NOT_IN_FAMILIES:
        kind = getattr(transformers, NOT_IN_FAMILIES[family])
        sizes = BY_NAME["llama"].config().to_dict()
        config = kind(**{k: v for k, v in sizes.items() if k not in ("model_type", "tie_word_embeddings")})
    else:
        config = BY_NAME[family].config()
    for key, value in RULES[family].items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 28:] = 0  # padding
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt without loss
    labels[1, 28:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
