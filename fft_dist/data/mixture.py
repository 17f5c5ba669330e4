"""`data.mixture`: several weighted sources, each tokenised (and cached) on its own, read as one split.

An entry is `name -> {path, weight, ...}`; every other key overrides that data.* setting for this
source only (format, columns, eval_path, eval_fraction, stride, max_examples...). Settings that
shape every batch (max_length, packing, shuffle) and the cache settings stay top-level.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from fft_dist.config import DataConfig, DataFormat
from fft_dist.errors import ConfigError

GLOBAL_KEYS = ("max_length", "packing", "shuffle", "group_by_length", "cache_dir", "num_proc", "inspect_terms",
               "mixture", "name")
"""Top-level only: they shape every batch, or name the whole run's data."""
ENTRY_KEYS = ("path", "weight")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_NAMES = ("best",)
"""eval_best_loss is already a metric."""


@dataclass(frozen=True)
class MixSource:
    """One source of a mixture: its name (the metrics use it), weight share (sums to 1) and settings."""

    name: str
    share: float
    cfg: DataConfig

    @property
    def where(self) -> str:
        """The config key errors name, e.g. data.mixture.replay."""
        return f"data.mixture.{self.name}"


def _per_source_keys() -> list[str]:
    return [f.name for f in fields(DataConfig) if f.name not in GLOBAL_KEYS]


def _weight(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.weight={value!r} must be a number > 0")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}.weight={value} must be a finite number > 0 (drop the entry to leave it out)")
    return float(value)


def mixture_sources(cfg: DataConfig) -> list[MixSource]:
    """The checked sources of `data.mixture`, in config order; ConfigError names the entry and key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    entries = dict(cfg.mixture or {})
    if not entries:
        raise ConfigError("data.mixture is empty")
    if cfg.path is not None:
        raise ConfigError("data.path and data.mixture are both set; with a mixture each source names its own "
                          "path (data.mixture.<name>.path), so set data.path=null")
    if cfg.eval_path is not None:
        raise ConfigError("data.eval_path and data.mixture are both set; give each source its own "
                          "data.mixture.<name>.eval_path (or let it hold out data.eval_fraction)")
    if cfg.group_by_length:
        raise ConfigError("data.group_by_length does not apply to data.mixture (every batch interleaves the "
                          "sources); set data.group_by_length=0")
    allowed = _per_source_keys()
    names = list(entries)
    base = replace(cfg, mixture={}, path=None, eval_path=None)
    out: list[tuple[str, float, DataConfig]] = []
    for name, entry in entries.items():
        where = f"data.mixture.{name}"
        if not _NAME.match(str(name)) or name in RESERVED_NAMES:
            raise ConfigError(f"{where}: a source name must be letters, digits, '_' or '-' (it becomes the metric "
                              f"eval_<name>_loss) and not one of {list(RESERVED_NAMES)}")
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping such as {{path: ..., weight: ...}}, got {entry!r}")
        entry = dict(entry)
        if entry.get("path") is None:
            if set(entry) <= {"weight"}:
                raise ConfigError(f"{where} sets a weight but no source of that name exists (known: "
                                  f"{', '.join(n for n in names if n != name)}); check the name")
            raise ConfigError(f"{where} has no path")
        if "weight" not in entry:
            raise ConfigError(f"{where} has no weight (e.g. {where}.weight=0.1)")
        weight = _weight(where, entry["weight"])
        for key in entry:
            if key == "name":
                raise ConfigError(f"{where}.name: a source's name is its key under data.mixture; drop this key")
            if key in GLOBAL_KEYS:
                raise ConfigError(f"{where}.{key}: data.{key} applies to every source; set it at the top level")
            if key not in allowed and key != "weight":
                raise ConfigError(f"{where}.{key}: unknown key; an entry takes weight and any of {allowed}")
        overrides = {k: v for k, v in entry.items() if k != "weight"}
        try:
            merged = OmegaConf.merge(OmegaConf.structured(replace(base, name=str(name))), overrides)
            source_cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            key = f".{e.full_key}" if getattr(e, "full_key", None) else ""
            raise ConfigError(f"{where}{key}: {str(e).splitlines()[0]}") from None
        out.append((str(name), weight, source_cfg))
    classifying = [n for n, _, c in out if c.format == DataFormat.classification]
    if classifying or cfg.format == DataFormat.classification:
        raise ConfigError(f"data.format=classification does not mix ({', '.join(classifying) or 'data.format'}): the "
                          "model's head follows the task, and a mixture interleaves causal-LM sources; train a "
                          "classifier on one source (data.path)")
    total = sum(w for _, w, _ in out)
    return [MixSource(name, w / total, c) for name, w, c in out]


def source_configs(cfg: DataConfig) -> list[tuple[str, DataConfig]]:
    """(the key prefix errors name, the settings) of every source: data itself, or each mixture entry."""
    if not cfg.mixture:
        return [("data", cfg)]
    return [(s.where, s.cfg) for s in mixture_sources(cfg)]
