"""Build a Hugging Face causal LM and its tokenizer from our config. No parallelism here."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from fft_dist.config import ASSETS_DIR, ConfigError, ModelConfig
from fft_dist.errors import CheckpointError

BUNDLED_TOKENIZER = ASSETS_DIR / "tokenizer"


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config: from model.path, or from model.arch for a random init."""
    if cfg.path is not None:
        try:
            config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
            raise CheckpointError(f"model.path={cfg.path}: {Path(cfg.path) / 'config.json'} is not a usable "
                                  f"transformers config: {e}") from None
    else:
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type")
        config = AutoConfig.for_model(model_type, **arch)
    config._attn_implementation = cfg.attn_implementation  # noqa: SLF001 - the supported switch
    config.use_cache = False
    return config


def tokenizer_dir(cfg: ModelConfig) -> Path:
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    if cfg.path is not None and any((Path(cfg.path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return Path(cfg.path)
    return BUNDLED_TOKENIZER


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(cfg)), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
            "use a matching model.tokenizer or set model.arch.vocab_size"
        )


def build_model(config: PretrainedConfig) -> nn.Module:
    """A randomly initialised fp32 model (weights from model.path are loaded later, per shard)."""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, found structurally so new architectures need no branch."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            best = list(module)
    return best


def apply_freeze(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """Freeze parameters on purpose (patterns, lowest N layers); returns the frozen names."""
    frozen_ids: set[int] = set()
    if cfg.freeze_layers:
        layers = decoder_layers(model)
        if cfg.freeze_layers > len(layers):
            raise ConfigError(f"model.freeze_layers={cfg.freeze_layers} but the model has {len(layers)} layers")
        for layer in layers[: cfg.freeze_layers]:
            frozen_ids.update(id(p) for p in layer.parameters())
        embeddings = model.get_input_embeddings()
        if embeddings is not None:
            frozen_ids.update(id(p) for p in embeddings.parameters())
    names = []
    matched_patterns: set[str] = set()
    for name, p in model.named_parameters():
        hits = [pat for pat in cfg.freeze if fnmatch.fnmatchcase(name, pat)]
        matched_patterns.update(hits)
        if hits or id(p) in frozen_ids:
            p.requires_grad_(False)
            names.append(name)
    unmatched = set(cfg.freeze) - matched_patterns
    if unmatched:
        raise ConfigError(f"model.freeze patterns match no parameter: {sorted(unmatched)}")
    return names


def enable_activation_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions leave p.numel() == 0
    return total


def compile_layers(model: nn.Module) -> int:
    """train.compile: torch.compile each decoder layer's forward, in place; returns how many.

    Only ``forward`` is compiled, not the module call, so the backends' module hooks (FSDP2's
    all-gather / reshard) stay eager, and parameter names, checkpoints and activation
    checkpointing are unchanged. The layers share one code object, so they share compiled graphs.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return len(layers)
