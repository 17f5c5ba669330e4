"""The model section: which architecture or folder, its tokenizer, and how it is built."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


TOKENIZER_BUNDLED = "bundled"
"""model.tokenizer=bundled: fft-dist's own 2048-token tokenizer, asked for on purpose."""


@dataclass
class ModelConfig:
    name: str = "tiny_llama"
    """Label for logs; the model/ config group sets it. With model.path it defaults to the folder's name."""
    path: str | None = None
    """Local Hugging Face folder (config.json, safetensors weights). None: build `arch` with random init."""
    arch: dict[str, Any] = field(default_factory=dict)
    """transformers config kwargs including model_type; used when path is None."""
    tokenizer: str | None = None
    """Tokenizer folder, or `bundled` (fft-dist's 2048-token byte-level BPE). None: model.path's own (a
    model.path without tokenizer files is refused), or the bundled one for a random init."""
    add_tokens: list[str] = field(default_factory=list)
    """Tokens to add (as special tokens, never split); the embeddings grow, new rows start at the mean
    of the old ones. The <|...|> markers of data.chat_template that the tokenizer lacks are added too."""
    pad_vocab_to_multiple_of: int = 0
    """Round the embedding rows up to a multiple of this (e.g. 64 for GPU kernels); 0: no rounding."""
    attn_implementation: str = "auto"
    """Attention kernel passed to transformers: auto (sdpa where the family supports it, else eager; the
    banner says which), eager, sdpa, flash_attention_2 ... A kernel the family does not support is refused."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in backward to save memory."""
    freeze: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names to keep frozen (e.g. 'model.embed_tokens.*')."""
    freeze_layers: int = 0
    """Freeze the lowest N decoder layers (and the input embeddings when N > 0)."""
