"""One descriptor per backend, and the one registry every other module looks backends up in.

Why: a backend used to be spread over about ten places (two dicts in this package, option tuples, an
``if backend ==`` chain in memory.py, literals in planner.py). Now a backend is one module that calls
:func:`register` with a :class:`Backend` (its options and checks, its memory formula and communication
volume, its strategy class) plus its yaml in ``conf/parallelism/``. The built-in ones live in
:mod:`fft_dist.strategy.backends` (registered when the package is imported); a module of your own
registers the same way (tests/support/toy_backend.py does).

Adding a backend: a module that defines its Strategy class (or names an existing one) and calls
``register(Backend(...))``, and ``conf/parallelism/<name>.yaml`` with ``name: <name>``. A built-in one is
imported from ``backends/__init__.py`` and its name is also listed in :class:`fft_dist.config.Parallelism`,
because the ranks type their config before they import this package; one of your own is added to that
enum by :func:`register` (import your module before fft-dist composes, and pass ``--config-dir`` for the yaml).

Pure: imports only the config module, so the launcher, ``estimate`` and ``plan`` never import
torch.distributed, transformers or DeepSpeed through it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fft_dist.config import BatchPlan, ConfigError, FFTConfig, ParallelismConfig, add_parallelism_name
from fft_dist.strategy.options import FIELDS, refuse_unread

Check = Callable[[FFTConfig, BatchPlan], None]
"""Raise ConfigError, naming the option to change, if the backend cannot run the config (pre-launch, pure)."""
Memory = Callable[[Any, FFTConfig, Any], Any]
"""(ModelShape, config, Setup) -> StateBytes: per-GPU model-state bytes of one estimate row
(:mod:`fft_dist.strategy.sizing` defines the three types)."""


@dataclass(frozen=True)
class Row:
    """One way to run a backend that ``estimate`` and ``plan`` size on its own (a conf/parallelism group)."""

    name: str
    """The row's name, which is also its yaml group: zero2, zero2_offload, ..."""
    offload: bool = False
    """States in CPU memory: listed after the rows on the GPU, and a plan's last resort."""


@dataclass(frozen=True)
class Backend:
    """Everything fft-dist knows about one parallelism backend."""

    name: str
    """``parallelism.name`` (the yaml's ``name:``)."""
    strategy: str
    """``module:Class`` of its :class:`~fft_dist.strategy.base.Strategy`, imported on the rank only."""
    memory: Memory
    comm_volume: Callable[[int], int]
    """Elements moved per optimizer step in units of the parameter count, given the accumulation steps
    (the planner's third ranking key)."""
    options: tuple[str, ...] = ()
    """The ``parallelism.*`` fields it reads besides ``name``: the one record of who reads what. :func:`check`
    refuses every other field that is set, naming the backends whose ``options`` list it."""
    notes: Mapping[str, str] = field(default_factory=dict)
    """Option it does not read -> why, where "read by <backends> only; use parallelism=<one>" says too little
    (fsdp: FSDP2 has no offload of its own, the DeepSpeed groups do)."""
    check: Check | None = None
    """Its own rules beyond the options it reads (run after the refusal of the options it does not read)."""
    rows: tuple[Row, ...] = ()
    """Its rows in every estimate table and plan; () lists it only when the config chooses it."""
    single_process: bool = False
    """One process only: sized at 1 GPU, and the only kind a plan considers there besides offload."""
    overrides: Callable[[Any], list[str]] | None = None
    """(Setup) -> the overrides besides ``parallelism=<row>`` that a plan prints for it."""
    deepspeed_stage: int | None = None
    """The ZeRO stage when DeepSpeed's engine runs this backend: the rank decides DeepSpeed's `auto` options for
    it (fft_dist.device_defaults), and launcher.use_deepspeed_launcher may start its ranks. None: torch runs it."""
    group_size: Callable[[FFTConfig, int], int | None] | None = None
    """(config, GPUs) -> ranks per shard group as configured, None where that cannot run on so many GPUs;
    unset for backends without groups. Sizing passes it to the memory formula as Setup.shard_size."""

    def strategy_class(self) -> type:
        module, _, cls = self.strategy.partition(":")
        return getattr(importlib.import_module(module), cls)

    def all_rows(self) -> tuple[Row, ...]:
        return self.rows or (Row(self.name),)


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend (the one registration point, for the built-ins and your own); re-registering a name
    replaces it. Its name becomes a valid ``parallelism.name``. ValueError if it names an option that does
    not exist (a typo would otherwise refuse the real option under it)."""
    unknown = [o for o in (*backend.options, *backend.notes) if o not in FIELDS]
    if unknown:
        raise ValueError(f"backend {backend.name!r} names {unknown}, which are not parallelism.* options")
    add_parallelism_name(backend.name)
    _REGISTRY[backend.name] = backend
    return backend


def backends() -> list[Backend]:
    """Every registered backend, in registration order (the built-ins: none, fsdp, hsdp, zero2, zero3)."""
    return list(_REGISTRY.values())


def get(name: Any) -> Backend:
    """The backend called `name` (a str or a Parallelism member)."""
    key = getattr(name, "value", name)
    if key not in _REGISTRY:
        raise ConfigError(f"parallelism={key} is not a known backend; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def check(cfg: FFTConfig, plan: BatchPlan) -> None:
    """Raise ConfigError, naming the option to change, if the chosen backend cannot run `cfg`: first every set
    ``parallelism.*`` option it does not read (for every backend, from the descriptors), then its own check."""
    backend = get(cfg.parallelism.name)
    check_options(cfg.parallelism)
    if backend.check is not None:
        backend.check(cfg, plan)


def check_options(parallelism: ParallelismConfig) -> None:
    """Refuse every set ``parallelism.*`` option the chosen backend does not list in its ``options``."""
    backend = get(parallelism.name)
    refuse_unread(parallelism, {b.name: b.options for b in backends()}, backend.notes)


def row_backend(row: str) -> Backend:
    """The backend an estimate row (zero2_offload, ...) belongs to."""
    for backend in backends():
        if any(r.name == row for r in backend.all_rows()):
            return backend
    return get(row)


def listed_rows(*, gpus: int, plan: bool = False) -> list[str]:
    """The rows every table shows at `gpus`: on the GPU first, offload last, each in registration order.

    estimate: single-process rows only at 1 GPU. plan: at 1 GPU only single-process and offload rows
    (sharding over one GPU saves nothing), at more GPUs everything but single-process rows.
    """
    out: list[tuple[bool, str]] = []
    for b in backends():
        for r in b.rows:
            if b.single_process and gpus != 1:
                continue
            if plan and gpus == 1 and not b.single_process and not r.offload:
                continue
            out.append((r.offload, r.name))
    return [name for _, name in sorted(out, key=lambda x: x[0])]  # stable: registration order within each


