"""Build a Hugging Face model for the task (causal LM, or sequence classification with a new head)
and its tokenizer from our config. No parallelism here."""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from fft_dist.config import ASSETS_DIR, ConfigError, DataFormat, FFTConfig, ModelConfig
from fft_dist.errors import CheckpointError
from fft_dist.model_checks import check_attention, check_heads, check_positions, refuse_custom_code

BUNDLED_TOKENIZER = ASSETS_DIR / "tokenizer"
CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
"""The tasks a model is built for; checkpoints record theirs (meta 'task') so a resume cannot mix them."""
_CLASSIFICATION_PROBLEM = "single_label_classification"


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config: from model.path, or from model.arch for a random init.

    Never with the folder's own code (trust_remote_code=False; a folder with auto_map is refused),
    and with the attention heads checked before transformers builds it (its own check is a traceback).
    """
    config = _folder_config(Path(cfg.path)) if cfg.path is not None else _arch_config(dict(cfg.arch))
    config._attn_implementation = cfg.attn_implementation  # noqa: SLF001 - the supported switch
    config.use_cache = False
    return config


def _folder_config(path: Path) -> PretrainedConfig:
    from huggingface_hub.errors import StrictDataclassError  # transformers' validation of a config's fields

    refuse_custom_code(path, "model.path")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        names = CONFIG_MAPPING[raw["model_type"]].attribute_map
    except (OSError, ValueError, KeyError, TypeError):
        pass  # unreadable or unknown: from_pretrained names the problem below
    else:
        check_heads(raw, names, f"{{}} in {path / 'config.json'}")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # JSON errors are ValueErrors
        raise CheckpointError(f"model.path={path}: {path / 'config.json'} is not a usable transformers config: "
                              f"{e}") from None


def _arch_config(arch: dict) -> PretrainedConfig:
    from huggingface_hub.errors import StrictDataclassError

    model_type = arch.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model.arch.model_type={model_type!r} is not a model type transformers knows "
                          "(fft-dist never runs a model's own code)")
    check_heads(arch, CONFIG_MAPPING[model_type].attribute_map, "model.arch.{}")
    try:
        return AutoConfig.for_model(model_type, **arch)
    except (ValueError, TypeError, StrictDataclassError) as e:
        raise ConfigError(f"model.arch: transformers refuses this {model_type} architecture: {e}") from None


def tokenizer_dir(cfg: ModelConfig) -> Path:
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    if cfg.path is not None and any((Path(cfg.path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return Path(cfg.path)
    return BUNDLED_TOKENIZER


def _code_free_tokenizer_dir(cfg: ModelConfig) -> Path:
    folder = tokenizer_dir(cfg)
    refuse_custom_code(folder, "model.tokenizer" if cfg.tokenizer is not None else "model.path")
    return folder


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    folder = _code_free_tokenizer_dir(cfg)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_model(cfg: FFTConfig, *, ranks_here: bool, our_packages: bool) -> None:
    """Before launch: what :func:`hf_config`, :func:`load_tokenizer` and the rank's model would refuse
    (custom code, heads, a broken config.json), data.max_length against the model's positions, and
    the attention kernel. `ranks_here`: the ranks use this machine's devices; `our_packages`: and this
    install's packages (not so in a container image, where :func:`build_model` reports it instead)."""
    from fft_dist.dist import warn0

    config = hf_config(cfg.model)
    _code_free_tokenizer_dir(cfg.model)
    source = f"model.path={cfg.model.path}" if cfg.model.path is not None else f"model={cfg.model.name}"
    warning = check_positions(config, cfg.data.max_length, source)
    if warning:
        warn0(warning)
    if our_packages:
        check_attention(cfg.model.attn_implementation, cuda=torch.cuda.is_available() if ranks_here else None)


def check_vocab(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
            "use a matching model.tokenizer or set model.arch.vocab_size"
        )


def task_of(data_format: DataFormat) -> str:
    return SEQUENCE_CLASSIFICATION if data_format == DataFormat.classification else CAUSAL_LM


def model_task(config: PretrainedConfig | dict) -> str:
    """The task a (stored) config was set up for by :func:`for_task`."""
    problem = config.get("problem_type") if isinstance(config, dict) else getattr(config, "problem_type", None)
    return SEQUENCE_CLASSIFICATION if problem == _CLASSIFICATION_PROBLEM else CAUSAL_LM


def task_architecture(model_type: str, task: str) -> str | None:
    """transformers' class name for `model_type` and `task` (None: it has none)."""
    from transformers.models.auto import modeling_auto as auto

    names = (auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if task == SEQUENCE_CLASSIFICATION
             else auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return names.get(model_type)


def for_task(config: PretrainedConfig, task: str, *, labels: list[str] = (), pad_token_id: int | None = None
             ) -> PretrainedConfig:
    """Set `config` up for `task`, in place. Classification: one output per label (id2label/label2id
    from `labels`, so an export names its classes), and pad_token_id, by which transformers pools
    the last non-pad token of each row. A classifier folder trained as a causal LM is set back."""
    arch = task_architecture(config.model_type, task)
    if task == SEQUENCE_CLASSIFICATION:
        if arch is None:
            raise ConfigError(f"data.format=classification: transformers has no sequence-classification model "
                              f"for model_type {config.model_type!r}")
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        config.pad_token_id = pad_token_id
        config.problem_type = _CLASSIFICATION_PROBLEM
        config.architectures = [arch]
    elif model_task(config) == SEQUENCE_CLASSIFICATION:
        config.problem_type = None
        config.architectures = [arch] if arch else None
    return config


def build_model(config: PretrainedConfig) -> nn.Module:
    """A randomly initialised fp32 model (weights from model.path are loaded later, per shard).

    An attention kernel transformers cannot use here (e.g. flash_attention_2 without its package,
    inside a container whose image was not checked before launch) is a config error, not a traceback.
    """
    auto = AutoModelForSequenceClassification if model_task(config) == SEQUENCE_CLASSIFICATION else AutoModelForCausalLM
    try:
        return auto.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except (ImportError, ValueError) as e:
        implementation = config._attn_implementation  # noqa: SLF001 - the supported switch
        if implementation in ("eager", "sdpa", None):
            raise
        raise ConfigError(f"model.attn_implementation={implementation} cannot be used here: {e}; "
                          "use model.attn_implementation=sdpa") from None


def new_head_names(model: nn.Module) -> list[str]:
    """Parameters outside the backbone (`base_model_prefix`): the task head, e.g. 'score.weight'.

    A causal-LM folder has none of a classifier's head, so these may start fresh (see load_pretrained).
    A causal LM has none: its lm_head is part of what a pretrained folder must hold.
    """
    if model_task(model.config) != SEQUENCE_CLASSIFICATION:
        return []
    prefix = getattr(model, "base_model_prefix", "") + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


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
