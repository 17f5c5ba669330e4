"""How a Hugging Face folder's tensors become the model's parameters, and back, in transformers' own terms.

transformers 5 builds some parameters in another layout than ``save_pretrained`` writes (an MoE's
experts are one fused ``mlp.experts.gate_up_proj`` of shape [E, 2I, H] in memory, one tensor per
expert on disk; Mixtral also renames ``block_sparse_moe`` to ``mlp``), and converts at load and save
time (``conversion_mapping.get_model_conversion_mapping``). This module asks transformers, through a
model built on the meta device, for those conversions and for the tied weights, and never keeps a
table of its own, so that:

- a rank loading a folder reads only what its range of a parameter needs (:func:`plan_load`,
  :func:`convert`): for a conversion that starts by stacking one tensor per expert along dim 0, a
  contiguous flat range covers a run of experts, and only those experts are read and converted;
- an export writes what ``save_pretrained`` writes (:func:`plan_export`, :func:`revert`);
- a folder in a layout transformers cannot map is refused before launch (:func:`check_pretrained_layout`).
"""
from __future__ import annotations

import copy
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from fft_dist.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from fft_dist.config import FFTConfig

Shape = tuple[int, ...]
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model fft-dist trains for `config` (its task's class, see fft_dist.model.build_model), on the meta
    device: names, shapes, conversions and tied weights at no memory cost (about 1 s for a 30B MoE)."""
    from fft_dist.model import build_model

    config = copy.deepcopy(config)
    config._attn_implementation = "eager"  # noqa: SLF001 - the supported switch; names do not depend on it
    with torch.device("meta"):
        return build_model(config)


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """transformers' tied parameters, {tied name: the name it is tied to} (e.g. lm_head.weight ->
    model.embed_tokens.weight); empty unless the config ties them (``tie_word_embeddings``)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    return dict(expand(all_submodels=True)) if expand is not None else {}


# -- load: folder tensors -> model parameters ----------------------------------------------------------------
@dataclass
class Group:
    """One conversion: folder tensors in, one or more model parameters out."""

    first: str
    """transformers' name for the conversion: its first target parameter."""
    sources: dict[str, list[str]]
    """Source pattern -> folder keys in order (a converter's i-th key of each pattern is expert i)."""
    converter: Any = None
    """A transformers WeightConverter; None: one folder tensor is the parameter (maybe renamed)."""
    shapes: dict[str, Shape] = field(default_factory=dict)
    """Target parameter -> full shape."""
    by_expert: bool = False
    """Dim 0 of the single target is the expert index, so experts [e0, e1) make rows [e0, e1)."""

    def keys(self) -> list[str]:
        return [k for keys in self.sources.values() for k in keys]


@dataclass
class LoadPlan:
    params: dict[str, Group]
    """Model parameter (and buffer) name -> the conversion that makes it."""
    unused: list[str]
    """Folder tensors no parameter is made from (buffers, another task's head, an unknown layout)."""
    tied: dict[str, str] = field(default_factory=dict)
    """A tied parameter the folder lacks -> its partner, which the conversion makes."""

    def target(self, name: str) -> str:
        """The name `name`'s conversion gives it (its tied partner's, for a tied parameter)."""
        return self.tied.get(name, name)

    def shape(self, name: str) -> Shape | None:
        group = self.params.get(name)
        return None if group is None else group.shapes[self.target(name)]


def _transforms(model: nn.Module) -> tuple[list, list]:
    """transformers' (renamings, converters) for loading `model`, legacy renamings included as in from_pretrained."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    mapping = get_model_conversion_mapping(model) if hasattr(model, "config") else []
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    return renamings, [t for t in mapping if isinstance(t, WeightConverter)]


def plan_load(model: nn.Module | None, shapes: dict[str, Shape], where: str) -> LoadPlan:
    """Which folder tensors make which parameter of `model`, as ``from_pretrained`` renames and converts them
    (names and shapes only: converters run on meta tensors). `shapes`: the folder's tensors (from the
    safetensors headers). Tied parameters absent from the folder come from their partner (both ways, as
    transformers ties them). `model` None (a folder without config.json): names are taken as they are.
    A converter whose per-expert keys do not count 0, 1, ... is a CheckpointError naming them."""
    if model is None:
        return LoadPlan({k: Group(k, {k: [k]}, shapes={k: tuple(s)}) for k, s in shapes.items()}, [])
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = _transforms(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    known = dict.fromkeys(model.state_dict(keep_vars=True), True)
    prefix = getattr(model, "base_model_prefix", "")
    converted: dict[str, Group] = {}
    plain: dict[str, Group] = {}
    unused: list[str] = []
    for key in sorted(shapes, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, known)
        if target not in known and key in known:  # as from_pretrained: the key was right as it was
            target, pattern = rename_source_key(key, [], [], prefix, known)
        if pattern is not None:
            group = converted.setdefault(target, Group(target, {}, by_pattern[pattern]))
            group.sources.setdefault(pattern, []).append(key)
        elif target in known and target not in plain:
            plain[target] = Group(target, {key: [key]}, shapes={target: tuple(shapes[key])})
        else:
            unused.append(key)
    params: dict[str, Group] = {}
    for group in converted.values():
        if set(group.sources) != set(group.converter.source_patterns):  # a partial layout: nothing to convert
            unused += group.keys()
            continue
        _plan_converter(group, model, shapes, where)
        if all(t in known for t in group.shapes):
            params.update(dict.fromkeys(group.shapes, group))
        else:
            unused += group.keys()
    for name, group in plain.items():
        if name in params:  # a converter makes it already (transformers keeps the first; we keep the conversion)
            unused += group.keys()
        else:
            params[name] = group
    aliases = {}
    for tied, partner in tied_pairs(model).items():
        if tied not in params and partner in params:
            params[tied], aliases[tied] = params[partner], partner
        elif partner not in params and tied in params:
            params[partner], aliases[partner] = params[tied], tied
    return LoadPlan(params, sorted(unused, key=dot_natural_key), aliases)


def _plan_converter(group: Group, model: nn.Module, shapes: dict[str, Shape], where: str) -> None:
    for pattern, keys in group.sources.items():
        _check_expert_numbers(pattern, keys, where)

    def meta(key: str) -> torch.Tensor:
        return torch.empty(shapes[key], device="meta")

    try:
        group.shapes = {name: tuple(t.shape) for name, t in convert(group, meta, model).items()}
        group.by_expert = _stacks_experts(group) and \
            tuple(convert(group, meta, model, (0, 1))[group.first].shape) == (1, *group.shapes[group.first][1:])
    except Exception as e:  # noqa: BLE001 - transformers' ops raise torch's errors for tensors that do not fit
        keys = group.keys()
        raise CheckpointError(f"{where}: cannot make {group.first} from {keys[0]} ... ({len(keys)} tensors, shapes "
                              f"{sorted({tuple(shapes[k]) for k in keys})}): {type(e).__name__}: {e}") from None


def _check_expert_numbers(pattern: str, keys: list[str], where: str) -> None:
    """The keys a `*` pattern collected number 0, 1, ..., n-1 (transformers stacks them in that order)."""
    if "*" not in pattern:
        return
    rx = re.compile(re.escape(pattern.lstrip("^")).replace(r"\*", r"(\d+)"))
    found = [m.group(1) for k in keys if (m := rx.search(k))]
    if len(found) == len(keys) and [int(n) for n in found] != list(range(len(keys))):
        raise CheckpointError(f"{where}: the tensors {pattern!r} number {found}, not 0 to {len(keys) - 1}: "
                              f"an expert is missing or doubled (e.g. {keys[0]})")


def _stacks_experts(group: Group) -> bool:
    """The conversion starts by stacking each pattern's tensors along dim 0 (transformers' MergeModulelist(dim=0))
    and no later operation touches dim 0, so experts [e0, e1) alone make rows [e0, e1) of its single target."""
    from transformers.core_model_loading import MergeModulelist

    ops = group.converter.operations
    if len(group.shapes) != 1 or not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return False
    for op in ops[1:]:
        dims = [getattr(op, a) for a in ("dim", "dim0", "dim1") if isinstance(getattr(op, a, None), int)]
        if not dims or min(dims) < 1:
            return False
    counts = {len(keys) for keys in group.sources.values()}
    shape = group.shapes[group.first]
    return len(counts) == 1 and len(shape) > 0 and shape[0] == counts.pop()


def convert(group: Group, read: Callable[[str], torch.Tensor], model: nn.Module,
            experts: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Run transformers' converter of `group` on the folder tensors `read` returns: all of them, or only
    experts ``[e0, e1)`` (then the target has e1 - e0 rows of dim 0). Returns {target name: tensor}."""
    conv = copy.deepcopy(group.converter)  # a fresh instance, as from_pretrained makes one per target
    for pattern, keys in group.sources.items():
        for key in keys if experts is None else keys[experts[0]:experts[1]]:
            conv.add_tensor(group.first, key, pattern, lambda key=key: read(key))
    out = conv.convert(group.first, model=model, config=model.config)
    return {name: (t[0] if isinstance(t, list) else t) for name, t in out.items()}


def expert_rows(group: Group, start: int, stop: int) -> tuple[int, int]:
    """The experts [e0, e1) whose rows cover the flat range [start, stop) of a `by_expert` target."""
    row = math.prod(group.shapes[group.first][1:])
    if start == stop or row == 0:
        return 0, 0
    return start // row, -(-stop // row)


# -- export: model parameters -> what save_pretrained writes --------------------------------------------------
@dataclass
class ExportGroup:
    """Checkpoint tensors reverted together, and the keys (with shapes) they become in the HF folder."""

    names: list[str]
    outputs: dict[str, Shape]


def _reverse_converters(model: nn.Module) -> list:
    """The converters ``revert_weight_conversion`` (save_pretrained) applies to `model`, in its order."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter

    forward = getattr(model, "_weight_conversions", None)
    if forward is None:
        forward = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    return [t for t in (c.reverse_transform() for c in forward[::-1]) if isinstance(t, WeightConverter)]


def plan_export(model: nn.Module, shapes: dict[str, Shape]) -> list[ExportGroup]:
    """The HF folder's keys and shapes for checkpoint tensors `shapes` (in their order), as ``save_pretrained``
    writes them: tied parameters left out (``tied_pairs``), the others reverted by transformers'
    ``revert_weight_conversion`` (run here on meta tensors; a fused expert tensor becomes one tensor per
    expert). Tensors that one reverse conversion needs together (transformers groups them by the name the
    conversion gives) form one group."""
    from transformers.core_model_loading import apply_converters

    tied = tied_pairs(model)
    converters = _reverse_converters(model)
    members: dict[str, list[str]] = {}
    for name in shapes:
        if name in tied and tied[name] in shapes:
            continue
        renamed, pattern = apply_converters(name, converters)
        members.setdefault(renamed if pattern is not None else "\0" + name, []).append(name)
    groups, seen = [], {}
    for names in members.values():
        out = revert(model, {n: torch.empty(shapes[n], device="meta") for n in names})
        for key in out:
            if key in seen:
                raise CheckpointError(f"export: {key} would be written twice (from {seen[key]} and {names})")
            seen[key] = names
        groups.append(ExportGroup(names, {k: tuple(t.shape) for k, t in out.items()}))
    return groups


def revert(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``revert_weight_conversion``: `tensors` (parameter name -> value) as save_pretrained names them."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


# -- before launch: can the folder's names be mapped at all? --------------------------------------------------
def folder_shapes(path: Path) -> dict[str, Shape] | None:
    """Every tensor's shape in an HF folder, from the safetensors headers only (no tensor data is read).
    None: the folder is not one we can read this way (the ranks' load then says why, exit 4)."""
    files: dict[str, list[str] | None]
    if (path / INDEX_FILE).is_file():
        try:
            wmap = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
            files = {f: [] for f in wmap.values()}
            for key, f in wmap.items():
                files[f].append(key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    elif (path / SINGLE_FILE).is_file():
        files = {SINGLE_FILE: None}
    else:
        return None
    shapes: dict[str, Shape] = {}
    for f, keys in files.items():
        if not isinstance(f, str) or f.startswith("/") or ".." in f.split("/"):
            return None
        header = _header(path / f)
        if header is None:
            return None
        try:
            for k in header.keys() - {"__metadata__"} if keys is None else keys:
                shapes[k] = tuple(int(d) for d in header[k]["shape"])
        except (KeyError, TypeError, ValueError):  # a key the index names but the file lacks, a bad header
            return None
    return shapes


def _header(file: Path) -> dict | None:
    try:
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100 << 20:
                return None
            header = json.loads(f.read(n))
        return header if isinstance(header, dict) else None
    except (OSError, ValueError, struct.error):
        return None


def check_pretrained_layout(cfg: FFTConfig) -> None:
    """Before launch: every parameter of the model fft-dist will train must be made from some tensor of
    ``model.path`` by transformers' conversions (a new task head excepted), reading the safetensors headers
    only. ConfigError (exit 2) naming what is missing and what the folder has that no parameter uses; a
    folder we cannot read this way is left to the ranks' load, which says why (exit 4)."""
    if cfg.model.path is None:
        return
    path = Path(cfg.model.path)
    shapes = folder_shapes(path)
    if shapes is None:
        return
    from fft_dist.model import for_task, hf_config, new_head_names, task_of

    config = for_task(hf_config(cfg.model), task_of(cfg.data.format), labels=["0", "1"])  # head shape: irrelevant
    model = meta_model(config)
    plan = plan_load(model, shapes, f"model.path={path}")
    heads = set(new_head_names(model))
    missing = [n for n, _ in model.named_parameters() if n not in plan.params and n not in heads]
    if missing:
        raise ConfigError(f"model.path={path}: its tensors cannot be mapped onto the {type(model).__name__} "
                          f"parameters (transformers has no conversion from this layout):\n"
                          f"  missing ({len(missing)}): {_some(missing)}\n"
                          f"  in the folder but used by no parameter ({len(plan.unused)}): {_some(plan.unused)}")


def _some(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "") if names else "none"
