"""The one compose -> type -> validate path: CLI overrides (or a written config.yaml) -> one resolved,
typed, validated config. ``train``, ``launch``, ``--cfg job``, ``data``, ``estimate``, ``plan`` and the
ranks all go through it, so they cannot disagree; the world size is the launcher's (nodes x ranks
per node), or a rank's real one.

The launcher composes once, resolves every interpolation (``${now:}``, ``${asset:}``) once, and
writes the result; every rank reads that. What the user typed last wins over a group default:
:func:`apply_user_intent` turns the few defaults that would silently override an explicit
choice into that choice, or into an error when two explicit choices conflict.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fft_dist.config import launcher as config_launcher
from fft_dist.config import ASSETS_DIR, BatchPlan, ConfigError, FFTConfig, conf_dir, variant_fields
from fft_dist.launchers import check_launcher, import_plugins
from fft_dist.validate import validate


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda fmt: datetime.now().strftime(fmt), use_cache=True)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name))
    if not OmegaConf.has_resolver("gpu_ranks"):  # launcher=container: one rank per GPU given (launcher.gpus)
        OmegaConf.register_new_resolver("gpu_ranks", lambda gpus, fallback: config_launcher.gpu_ranks(gpus, fallback))


def _store_schema() -> None:
    """The whole schema, and each option's own as ``<section>_schema/<name>`` (e.g. ``launcher_schema/slurm``,
    ``optimizer_schema/sgd``): the option's yaml names it in its defaults list."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="fft_dist_schema", node=FFTConfig)
    for _, group in variant_fields(FFTConfig):
        for name, schema in group.schemas.items():
            store.store(group=group.store_group, name=name, node=schema)


def override_keys(overrides: list[str]) -> set[str]:
    """Dotted keys the user set on the command line (``+a.b=1``, ``++a.b=1``, ``~a.b`` -> ``a.b``)."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~").strip()
        if key and not key.startswith("hydra."):
            keys.add(key)
    return keys


def _set_by(keys: set[str], key: str) -> bool:
    return key in keys or any(k.startswith(key + ".") for k in keys)


def compose(overrides: list[str], *, config_dirs: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with CLI overrides, then apply the user-intent rules.

    ``config_dirs`` are extra folders searched for group files (a user's own
    ``model/my_model.yaml`` or ``data/my_data.yaml``), ahead of the bundled ones.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _register_resolvers()
    import_plugins()
    _store_schema()
    hydra_overrides = list(overrides)
    if config_dirs:
        paths = ",".join(f"file://{Path(d).resolve()}" for d in config_dirs)
        hydra_overrides.append(f"hydra.searchpath=[{paths}]")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=hydra_overrides)
        except Exception as e:
            named = _option_error(e, overrides)
            if named is not None:
                raise named from None
            raise
    apply_user_intent(cfg, override_keys(overrides))
    return cfg


def _option_error(error: BaseException, overrides: list[str]) -> ConfigError | None:
    """When composing failed on a section typed by its option's schema (``launcher.nodes=2`` under
    launcher=torchrun, ``optimizer.momentum=abc``): one ConfigError naming the key and the chosen option.
    None for anything else (Hydra's own message stands)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    groups = dict(variant_fields(FFTConfig))
    cur: BaseException | None = error
    while cur is not None:
        section, _, key = str(getattr(cur, "full_key", None) or "").partition(".")
        if isinstance(cur, OmegaConfBaseException) and section in groups and key and isinstance(
                getattr(cur, "object_type", None), type) and dataclasses.is_dataclass(cur.object_type):
            group = groups[section]
            if isinstance(cur, (ConfigAttributeError, ConfigKeyError)):
                return group.not_an_option(key.split(".")[0], _chosen(group, cur.object_type, overrides))
            return ConfigError(f"{section}.{key}: {str(cur).splitlines()[0]}")
        cur = cur.__cause__ or cur.__context__
    return None


def _chosen(group, schema: type | None, overrides: list[str]) -> str:
    """The option of `group` that composing picked: the last ``<section>=<name>`` override (or the default),
    unless that file names another option's schema (a group file of your own copying a bundled one)."""
    chosen = group.default
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+") == group.section and value:
            chosen = value
    if (chosen in group.schemas and group.schema(chosen) is schema) or schema is group.base:
        return chosen  # the base: a file of your own that names no option's schema
    return next((name for name, s in group.schemas.items() if s is schema), chosen)


def apply_user_intent(cfg: DictConfig, keys: set[str]) -> None:
    """Explicit choices beat group defaults; two explicit choices that contradict are an error."""
    train = cfg.train
    if "train.epochs" in keys:
        if "train.max_steps" in keys and train.max_steps:
            raise ConfigError(
                f"train.epochs={train.epochs} and train.max_steps={train.max_steps} both set the run length; "
                "set one (train.max_steps=0 derives the length from train.epochs)"
            )
        train.max_steps = 0
    if "train.warmup_steps" in keys and "train.warmup_ratio" not in keys:
        train.warmup_ratio = 0.0
    if "train.warmup_ratio" in keys and "train.warmup_steps" not in keys:
        train.warmup_steps = 0
    model = cfg.model
    if model.path:
        if _set_by(keys, "model.arch"):
            raise ConfigError(
                "model.arch.* and model.path both describe the architecture; with model.path the architecture "
                f"comes from {Path(model.path) / 'config.json'}, so drop the model.arch overrides"
            )
        if "model.name" not in keys:
            model.name = Path(model.path).resolve().name
        config_json = Path(model.path) / "config.json"
        try:  # record what is actually trained; a missing or broken file is reported by the checks
            model.arch = json.loads(config_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            pass


def _unknown_keys(node, schema: type, prefix: str = "") -> list[str]:
    """Keys in `node` that the dataclass `schema` does not have (``+foo=bar`` slips past Hydra). A section
    whose options have their own schema is checked against the chosen one's (:meth:`Variants.check_keys`)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    groups = dict(variant_fields(schema))
    hints = typing.get_type_hints(schema)
    unknown = []
    for key in node.keys():
        if key not in fields:
            unknown.append(f"{prefix}{key}")
        elif key in groups and isinstance(node[key], DictConfig):
            groups[key].check_keys(node[key].keys(), groups[key].name_of(node[key]))
        elif dataclasses.is_dataclass(hints.get(key)) and isinstance(node[key], DictConfig):
            unknown += _unknown_keys(node[key], hints[key], f"{prefix}{key}.")
    return unknown


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve every interpolation (${now:}, ${asset:}, ${run.dir}) exactly once."""
    _register_resolvers()
    OmegaConf.resolve(cfg)
    return cfg


def to_typed(cfg: DictConfig) -> FFTConfig:
    unknown = _unknown_keys(cfg, FFTConfig)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; `fft-dist train --help` lists the options")
    schema = OmegaConf.structured(FFTConfig)
    for key, group in variant_fields(FFTConfig):  # the chosen option's own schema (config.yaml holds plain values)
        if isinstance(cfg.get(key), DictConfig):
            schema[key] = OmegaConf.structured(group.schema(group.name_of(cfg[key])))
    try:
        merged = OmegaConf.merge(schema, cfg)
    except Exception as e:
        named = _option_error(e, [])
        if named is not None:
            raise named from None
        raise
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_yaml(cfg: FFTConfig | DictConfig) -> str:
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def load_yaml(path: str | os.PathLike) -> FFTConfig:
    """Load a resolved config.yaml written by the launcher (every rank reads the same file)."""
    return load_text(Path(path).read_text(encoding="utf-8"))


def load_text(text: str) -> FFTConfig:
    """Type a resolved config's YAML (config.yaml, or rank 0's resolution sent to every rank)."""
    _register_resolvers()
    return to_typed(OmegaConf.create(text))


def describe_error(e: BaseException) -> str:
    """Hydra hides the useful part (e.g. "Key 'max_stepz' is not in struct") in the cause chain."""
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).strip()
        if text and text not in parts and "$VALUE" not in text:
            parts.append(text)
        cur = cur.__cause__ or cur.__context__
    return "\n  ".join(parts)


@dataclasses.dataclass
class Prepared:
    """A resolved config ready to run: typed, its YAML (what config.yaml holds), and the batch plan."""

    cfg: FFTConfig
    yaml: str
    plan: BatchPlan


def typed(overrides: list[str], *, config_dirs: list[str] | None = None) -> tuple[FFTConfig, str]:
    """Compose, resolve once and type: (config, its YAML). `estimate` and `plan` stop here (they size
    many world sizes); everything that runs goes on to :func:`checked`."""
    node = resolve(compose(overrides, config_dirs=config_dirs))
    return to_typed(node), to_yaml(node)


def checked(cfg: FFTConfig, yaml: str, *, world_size: int | None = None) -> Prepared:
    """Validate against the world size that will run.

    ``world_size=None``: a command (train, launch, --cfg job, data) checks the launcher's options and
    takes the whole job's ranks from it (nodes x ranks per node). A rank passes its real WORLD_SIZE.
    """
    if world_size is None:
        from fft_dist.strategy import get as backend  # imported here: `--help` and typing need no torch

        world_size = check_launcher(cfg.launcher, backend(cfg.parallelism.name)).world_size()
    return Prepared(cfg, yaml, validate(cfg, world_size))


def prepare(overrides: list[str], *, world_size: int | None = None, config_dirs: list[str] | None = None) -> Prepared:
    """:func:`typed` then :func:`checked`; raises ConfigError (or Hydra's own errors)."""
    cfg, yaml = typed(overrides, config_dirs=config_dirs)
    return checked(cfg, yaml, world_size=world_size)


def report(kind: str, error: BaseException) -> None:
    """One clear line (plus causes) on stderr for an error the user can fix."""
    print(f"fft-dist: {kind}: {describe_error(error)}", file=sys.stderr, flush=True)


def report_known(error: BaseException, *, show: bool = True) -> int:
    """The documented exit code of an error the user can fix (reported once when `show`); a bug re-raises."""
    from fft_dist.errors import classify

    known = classify(error)
    if known is None:
        raise error
    if show:
        report(known[0], error)
    return known[1]
