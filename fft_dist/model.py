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

from fft_dist.config import (ASSETS_DIR, TOKENIZER_BUNDLED, ConfigError, DataConfig, DataFormat, FFTConfig,
                             ModelConfig)
from fft_dist.errors import CheckpointError
from fft_dist.models.family import resolve_attention
from fft_dist.models.vocab import add_tokens, grown_vocab_size, tokens_to_add
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
    config._attn_implementation = resolve_attention(config, cfg.attn_implementation)  # noqa: SLF001 - the supported switch
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


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_dir(cfg: ModelConfig) -> Path:
    """model.tokenizer (a folder, or `bundled`), else model.path's own tokenizer, else (random init)
    the bundled one. A model.path without tokenizer files is refused: training a real model with an
    unrelated 2048-token tokenizer, and exporting that as the model's own, is never what was meant."""
    if cfg.tokenizer == TOKENIZER_BUNDLED:
        return BUNDLED_TOKENIZER
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    if cfg.path is None:
        return BUNDLED_TOKENIZER
    if any((Path(cfg.path) / f).is_file() for f in TOKENIZER_MARKERS):
        return Path(cfg.path)
    raise ConfigError(f"model.path={cfg.path} has no tokenizer files ({', '.join(TOKENIZER_MARKERS[:2])} ...); "
                      f"name the model's tokenizer with model.tokenizer=<folder>, or model.tokenizer="
                      f"{TOKENIZER_BUNDLED} to train with fft-dist's bundled 2048-token tokenizer on purpose")


def _code_free_tokenizer_dir(cfg: ModelConfig) -> Path:
    folder = tokenizer_dir(cfg)
    refuse_custom_code(folder, "model.tokenizer" if cfg.tokenizer is not None else "model.path")
    return folder


def explicit_chat_template(data: DataConfig) -> str | None:
    """The template text data.chat_template gives a chat run (None: the tokenizer's own is used)."""
    from fft_dist.data.encode import chat_template_file

    if data.format != DataFormat.chat or data.chat_template is None:
        return None
    path = chat_template_file(data.chat_template)
    return data.chat_template if path is None else path.read_text(encoding="utf-8")


def load_tokenizer(cfg: ModelConfig, *, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The run's tokenizer: the folder's, plus model.add_tokens and the markers `chat_template` needs
    (:mod:`fft_dist.models.vocab`), with `chat_template` as its own (so checkpoints and the export carry
    the template the run trained with)."""
    folder = _code_free_tokenizer_dir(cfg)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    added = tokens_to_add(tok, list(cfg.add_tokens), chat_template)
    add_tokens(tok, added)
    tok.fft_dist_added = added  # what grow_vocab makes room for
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def save_run_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Path:
    """The run's tokenizer (its added tokens, its chat template) saved where each checkpoint copies it
    from: a temporary folder of this process, removed at exit (and by the worker after the export)."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="fft-dist-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)
    tokenizer.save_pretrained(str(folder))
    return folder


def grow_vocab(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig) -> int | None:
    """Grow config.vocab_size to the tokenizer (tokens were added, or model.pad_vocab_to_multiple_of asks
    for it); the old size when it grew, else None. A tokenizer larger than the embeddings without either
    is refused, naming the fix."""
    old = getattr(config, "vocab_size", None)
    if old is None:
        return None
    grow = bool(getattr(tokenizer, "fft_dist_added", ())) or cfg.pad_vocab_to_multiple_of > 0
    new = grown_vocab_size(old, len(tokenizer), cfg.pad_vocab_to_multiple_of) if grow else old
    if len(tokenizer) > new:
        raise ConfigError(
            f"the tokenizer ({tokenizer_dir(cfg)}) has {len(tokenizer)} tokens but the model's embeddings have {old} "
            "rows; use the model's own tokenizer (model.tokenizer=<folder>), or grow the embeddings on purpose with "
            "model.pad_vocab_to_multiple_of=<n> (new rows start at the mean of the old ones)")
    if new == old:
        return None
    config.vocab_size = new
    return old


def check_model(cfg: FFTConfig, *, ranks_here: bool, our_packages: bool) -> None:
    """Before launch: what :func:`hf_config`, :func:`load_tokenizer` and the rank's model would refuse
    (custom code, heads, a broken config.json, an attention kernel the family lacks, a tokenizer the
    embeddings cannot hold), data.max_length against the model's positions, and the attention kernel's package. `ranks_here`: the ranks use this machine's devices; `our_packages`: and this
    install's packages (not so in a container image, where :func:`build_model` reports it instead)."""
    from fft_dist.dist import warn0

    config = hf_config(cfg.model)
    source = f"model.path={cfg.model.path}" if cfg.model.path is not None else f"model={cfg.model.name}"
    warning = check_positions(config, cfg.data.max_length, source)
    if warning:
        warn0(warning)
    if our_packages:
        check_attention(cfg.model.attn_implementation, cuda=torch.cuda.is_available() if ranks_here else None)
    grow_vocab(config, load_tokenizer(cfg.model, chat_template=explicit_chat_template(cfg.data)), cfg.model)


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
