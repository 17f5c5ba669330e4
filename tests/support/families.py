"""The model families the conformance suite (tests/e2e/test_families.py) trains from a `model.path` folder.

One row per family: a name, the transformers config class, and the tiny shape (hidden 64, 2 layers,
4 attention heads and 2 key/value heads where the family has them, vocab 2048 to match the bundled
tokenizer in ``fft_dist/assets/tokenizer``, a small MLP, MoE with 4 experts and top-2 routing).
**Adding a family is one row in FAMILIES** (plus, where fft-dist needs code for it, a module in
``fft_dist/models/``); every backend test picks the row up. A row may also carry fft-dist overrides
its family needs (e.g. an attention kernel) and say which attention kernel the reference
``from_pretrained`` uses.

:func:`make_folder` writes a seeded, tiny, random-weight model with ``save_pretrained`` plus the
bundled tokenizer's files: what a user's ``model.path`` folder looks like. The session fixture
``family_folders`` (tests/conftest.py) makes each folder once per test session.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[2] / "fft_dist" / "assets" / "tokenizer"
SEED = 20260317
"""The seed of every folder's weights (not train.seed: a run that ignored model.path would show)."""

COMMON = {
    "vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 256,
    # the bundled tokenizer's ids: <|endoftext|> is bos and eos, <|pad|> is 1
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
}
GQA = {"num_key_value_heads": 2, "intermediate_size": 128}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    """A class of the `transformers` package, e.g. 'LlamaConfig'."""
    kwargs: dict = field(default_factory=dict)
    """The tiny shape, on top of COMMON."""
    overrides: tuple[str, ...] = ()
    """fft-dist overrides this family needs (on every backend)."""
    def config(self):
        import transformers

        return getattr(transformers, self.config_class)(**{**COMMON, **self.kwargs})

    @property
    def attn_implementation(self) -> str:
        """The kernel fft-dist's default (auto) picks for the family, which the reference loads with too."""
        from fft_dist.models.family import resolve_attention

        return resolve_attention(self.config(), "auto")

    @property
    def tied(self) -> bool:
        return bool(self.config().tie_word_embeddings)


FAMILIES: list[Family] = [
    Family("llama", "LlamaConfig", {**GQA, "head_dim": 16}),
    Family("qwen2", "Qwen2Config", {**GQA, "tie_word_embeddings": True}),
    Family("qwen3", "Qwen3Config", {**GQA, "head_dim": 16}),  # q/k norms
    Family("mistral", "MistralConfig", {**GQA, "head_dim": 16, "sliding_window": 32}),  # 32 < data.max_length
    Family("phi3", "Phi3Config", {**GQA, "original_max_position_embeddings": 256}),  # fused qkv and gate_up
    # Gemma: head_dim 32 != hidden / heads, query_pre_attn_scalar, soft-capping (2), sliding and full
    # layers, tied embeddings, an embed_scale buffer. transformers 5.25 has no sdpa for Gemma-2, so
    # fft-dist's model.attn_implementation=auto picks eager for it.
    Family("gemma2", "Gemma2Config", {**GQA, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 32}),
    Family("gemma3", "Gemma3TextConfig", {**GQA, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 32,
                                          "layer_types": ["sliding_attention", "full_attention"]}),
    Family("gpt_neox", "GPTNeoXConfig", {"intermediate_size": 128}),  # no GQA; output embedding `embed_out` on disk
    Family("olmo2", "Olmo2Config", GQA),
    Family("qwen2_moe", "Qwen2MoeConfig", {**GQA, **MOE, "shared_expert_intermediate_size": 64}),
    Family("qwen3_moe", "Qwen3MoeConfig", {**GQA, **MOE, "head_dim": 16}),
    Family("mixtral", "MixtralConfig", {**GQA, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2}),
]
BY_NAME = {f.name: f for f in FAMILIES}
REPRESENTATIVE = ("llama", "qwen2", "qwen2_moe")
"""Untied dense, tied, MoE: what the fast run checks on the DeepSpeed backends."""


def make_folder(family: Family, dest: Path) -> Path:
    """`dest` as a model.path folder: ``save_pretrained`` of a seeded random model, plus the bundled
    tokenizer's files. Every parameter (norms included) gets seeded noise on top of transformers'
    init, so a tensor that is not loaded from the folder changes the loss."""
    import torch
    from transformers import AutoModelForCausalLM

    dest = Path(dest)
    config = family.config()
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(dest)
    for f in TOKENIZER.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    return dest
