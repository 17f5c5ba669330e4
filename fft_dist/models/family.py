"""What fft-dist needs to know about a model family, asked of transformers first.

transformers already describes most of it: the config's attribute map says which key holds the
hidden size (GPT-2's ``n_embd``), the model class says which attention kernels it supports
(``_supports_sdpa``), its ``_init_weights`` rebuilds every buffer (rotary frequencies, Gemma's
embedding scale), its tied-weights keys say which output embedding is tied. A family needs code of
its own here only for what transformers does not express; adding a family is then a row in the
conformance suite (tests/support/families.py) and, only if it has such a quirk, an entry below.
"""
from __future__ import annotations

from typing import Any

from fft_dist.errors import ConfigError

ATTENTION_AUTO = "auto"
ATTENTION_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                   "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}
"""model.attn_implementation -> the class attribute transformers checks before it builds the model."""


def text_config(config: Any) -> Any:
    """The decoder's config (a multimodal config nests it; a text model's is itself)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def dimension(config: Any, name: str, default: int | None = None) -> int:
    """A size by transformers' standard name (hidden_size, num_attention_heads, intermediate_size ...),
    through the config's own attribute map (GPT-2: hidden_size -> n_embd)."""
    value = getattr(text_config(config), name, None)
    if isinstance(value, int) and value > 0:
        return value
    if default is not None:
        return default
    raise ConfigError(f"model {getattr(config, 'model_type', '?')}: its config has no {name}, which fft-dist needs "
                      "to size the run (model.arch / model.path config.json)")


def hidden_size(config: Any) -> int:
    return dimension(config, "hidden_size")


def causal_lm_class(config: Any):
    """The class AutoModelForCausalLM builds for `config` (None: transformers has none)."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping  # noqa: SLF001 - the Auto class's own lookup
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def supported_attention(config: Any) -> list[str]:
    """The attention kernels transformers lets this family use (eager always)."""
    cls = causal_lm_class(config)
    if cls is None:
        return ["eager", "sdpa"]
    return ["eager", *[impl for impl, flag in ATTENTION_FLAGS.items() if getattr(cls, flag, False)]]


def resolve_attention(config: Any, requested: str) -> str:
    """model.attn_implementation for this family: ``auto`` is sdpa where the family supports it, else
    eager; an explicit kernel the family does not support is refused, naming one that works."""
    supported = supported_attention(config)
    if requested == ATTENTION_AUTO:
        return "sdpa" if "sdpa" in supported else "eager"
    if requested not in supported and requested in ATTENTION_FLAGS:
        raise ConfigError(f"model.attn_implementation={requested}: transformers does not support it for "
                          f"{getattr(config, 'model_type', '?')} models; use one of {', '.join(supported)} "
                          f"(or auto, which picks {'sdpa' if 'sdpa' in supported else 'eager'})")
    return requested


def rebuild_buffers(model) -> None:
    """After a meta-device build: give every buffer the value transformers' own init gives it.

    Buffers are not in checkpoints or (non-persistent ones) in model folders: rotary frequencies,
    Gemma's embedding scale. ``_init_weights`` computes them; every parameter is marked initialised
    first (it is loaded next), exactly as ``from_pretrained`` marks loaded weights, so only the
    buffers are written.
    """
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise ConfigError(f"{type(model).__name__}: no _init_weights, so its buffers cannot be rebuilt after a "
                          "meta-device build")
    params = list(model.parameters())
    flagged = [p for p in params if not getattr(p, "_is_hf_initialized", False)]
    for p in flagged:
        p._is_hf_initialized = True
    try:
        import torch

        with torch.no_grad():
            for module in model.modules():
                if any(True for _ in module.buffers(recurse=False)):
                    init(module)
    finally:
        for p in flagged:
            p._is_hf_initialized = False


def embedding_rows(model, vocab: int) -> dict[str, tuple[int, ...]]:
    """name -> full shape of every parameter of the input and output embeddings that has a row per
    token (`vocab` rows): the tensors that grow with the vocabulary. A tied output embedding is the
    input one (one parameter), so it appears once."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[int, ...]] = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in module.parameters(recurse=False) if module is not None else ():
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape
            name = names.get(id(p))
            if name is not None and shape and shape[0] == vocab:
                out[name] = shape
    return out
