"""Model settings that would only fail inside a rank (a traceback after launch), checked from the
config alone: custom code in a model folder, attention heads, sequence length, attention kernel.

No torch or transformers import here: each check reads a config.json or a transformers config
object, so :mod:`fft_dist.model` runs them where it builds configs and the launcher before launch.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from fft_dist.errors import ConfigError

CODE_FILES = ("config.json", "tokenizer_config.json")
"""Where transformers finds `auto_map`, the pointer to a folder's own Python classes."""
FLASH_PACKAGES = {"flash_attention_2": "flash_attn"}
"""model.attn_implementation values that need a package (and CUDA) besides transformers."""
ROTARY_ATTRIBUTES = ("rope_parameters", "rope_scaling", "rope_theta")


def refuse_custom_code(folder: Path, option: str) -> None:
    """fft-dist never runs a model folder's own code: transformers would ask y/N on a terminal (on
    every rank) and `y` imports whatever the folder holds. We pass trust_remote_code=False, and
    refuse the folder here with a reason instead of transformers' prompt or its ValueError."""
    for name in CODE_FILES:
        try:
            found = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # missing or broken: reported where the file is read
        auto_map = found.get("auto_map") if isinstance(found, dict) else None
        if auto_map:
            raise ConfigError(
                f"{option}={folder}: {folder / name} has an auto_map ({', '.join(sorted(auto_map))} from the "
                "folder's own Python files); fft-dist never runs code from a model folder (trust_remote_code is "
                "always False). Use a checkpoint of an architecture transformers ships (its model_type), or, if "
                "the model_type is one transformers knows, delete the auto_map entry from that file.")


def _suggest(n: int, around: int) -> list[int]:
    """The divisors of `n` closest to `around`."""
    return sorted(sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - around))[:3])


def check_heads(raw: dict[str, Any], attribute_map: dict[str, str], name: str) -> None:
    """Attention heads that split the hidden size evenly (unless head_dim is set), and query heads
    that form whole groups per key/value head. `raw` is model.arch or config.json; `attribute_map`
    maps transformers' standard names to this architecture's keys (GPT-2: n_head); `name` shows a
    `key=value` as the user sets it ("model.arch.{}", or "{} in <folder>/config.json")."""
    def get(standard: str) -> tuple[str, Any]:
        key = attribute_map.get(standard, standard)
        return key, raw.get(key, raw.get(standard))

    (h_key, hidden), (n_key, heads), (kv_key, kv) = map(get, ("hidden_size", "num_attention_heads",
                                                               "num_key_value_heads"))
    if not all(isinstance(v, int) and v > 0 for v in (hidden, heads)):
        return
    if hidden % heads and not raw.get("head_dim"):
        raise ConfigError(f"{name.format(f'{n_key}={heads}')} does not divide {name.format(f'{h_key}={hidden}')} "
                          f"(each head gets hidden/heads dimensions); use a divisor such as {_suggest(hidden, heads)}")
    if isinstance(kv, int) and kv > 0 and heads % kv:
        raise ConfigError(f"{name.format(f'{n_key}={heads}')} is not a multiple of {name.format(f'{kv_key}={kv}')} "
                          "(grouped-query attention shares each key/value head among heads/kv query heads); "
                          f"use key/value heads such as {_suggest(heads, kv)}")


def check_positions(config: Any, max_length: int, source: str) -> str | None:
    """data.max_length against the positions the model has: refused beyond learned absolute position
    embeddings (n_positions, or max_position_embeddings without rotary settings: the embedding
    lookup would fail inside the model); a warning (returned) beyond a rotary model's trained range.

    Decided from the config's attributes, not by model family: `rope_parameters`/`rope_scaling`/
    `rope_theta` mean rotary positions; a config with none of them and no position limit (ALiBi) is fine.
    """
    learned = getattr(config, "n_positions", None)
    limit = learned or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or max_length <= limit:
        return None
    key = "n_positions" if learned else "max_position_embeddings"
    if learned or not any(getattr(config, a, None) for a in ROTARY_ATTRIBUTES):
        raise ConfigError(f"data.max_length={max_length} is longer than the model's learned position embeddings "
                          f"({source}: {key}={limit}); a longer row has no position embedding; use "
                          f"data.max_length<={limit}")
    return (f"data.max_length={max_length} is longer than the model's {key}={limit} ({source}); its rotary "
            "positions will go past the range it was trained on (quality may drop)")


def check_attention(implementation: str, *, cuda: bool | None) -> None:
    """A flash-attention kernel needs its package and CUDA GPUs. `cuda`: whether the ranks' machine has
    CUDA (None: unknown here, e.g. a SLURM login node)."""
    package = FLASH_PACKAGES.get(implementation)
    if package is None:
        return
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"model.attn_implementation={implementation} needs the {package} package, which is not "
                          f"installed (pip install {package.replace('_', '-')}); or use "
                          "model.attn_implementation=sdpa")
    if cuda is False:
        raise ConfigError(f"model.attn_implementation={implementation} runs on CUDA GPUs only, and this is a "
                          "CPU-only run; use model.attn_implementation=sdpa")
