"""Every model a user brings (issue #16 items 2-6): buffers after a meta-device build, attention a family
cannot run, a model folder without a tokenizer, new tokens, and mismatches found before launch.

The family-by-backend conformance matrix is tests/e2e/test_families.py; these are the cases
each finding needs, as cheap as they can be (pure checks in process, dry runs before launch, few real runs).
"""
from __future__ import annotations

import pytest
import torch

from model_families_shared import config_of


# -- 2. buffers after a meta-device build (FSDP from model.path) ---------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox"])
def test_buffers_after_a_meta_build_are_transformers_own(family):
    """Gemma's embed_scale lives in a module that owns a parameter: the old rebuild skipped it and left
    uninitialised memory (1e10, -3e38) where sqrt(hidden) belongs."""
    from transformers import AutoModelForCausalLM

    from fft_dist.models.family import rebuild_buffers

    config = config_of(family)
    reference = dict(AutoModelForCausalLM.from_config(config).named_buffers())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    for _, b in model.named_buffers():
        b.fill_(float("nan"))  # what to_empty may hand out
    rebuild_buffers(model)
    got = dict(model.named_buffers())
    assert sorted(got) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(got[name], value), f"{family}: buffer {name} differs after a meta build"


def test_grown_rows_are_the_mean_of_the_old_rows_read_in_chunks(monkeypatch):
    from fft_dist.models import vocab

    monkeypatch.setattr(vocab, "MEAN_CHUNK_ROWS", 3)
    old = torch.randn(10, 4)

    class Source:
        def has(self, name, kind):
            return True

        def shape(self, name):
            return (10, 4)

        def read(self, name, kind, start, stop):
            return old.reshape(-1)[start:stop].clone()

        def close(self):
            pass

    grown = vocab.GrownVocabulary(Source(), {"emb": (13, 4)}, old_rows=10)
    assert grown.shape("emb") == (13, 4)
    full = grown.read("emb", "param", 0, 52).reshape(13, 4)
    assert torch.equal(full[:10], old)
    assert torch.allclose(full[10:], old.double().mean(0).float().expand(3, 4), rtol=0, atol=1e-7)
    assert torch.equal(grown.read("emb", "param", 41, 47), full.reshape(-1)[41:47])  # any range, any offset
