"""Every ``parallelism.*`` option does something under the chosen backend or is refused: one check for all.

Each backend's descriptor lists the options it reads (:attr:`fft_dist.strategy.backend.Backend.options`);
that list is the only record of who reads what. :func:`refuse_unread` refuses, before any rank starts,
every option that is set but not read by the chosen backend, and names the registered backends that do
read it. "Set" means: different from the dataclass default in :class:`fft_dist.config.ParallelismConfig`
(the shipped yaml groups only repeat those defaults).

Pure: imports only the config module, so the launcher can run it without torch.distributed,
transformers or DeepSpeed.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from fft_dist.config import ConfigError, ParallelismConfig

_DEFAULTS = ParallelismConfig()
FIELDS = tuple(f.name for f in dataclasses.fields(ParallelismConfig) if f.name != "name")
"""Every parallelism.* option a backend may read."""


def changed(parallelism: ParallelismConfig) -> list[str]:
    """The options whose value differs from the ParallelismConfig default (true/True/"true" alike)."""
    return [f for f in FIELDS if _norm(getattr(parallelism, f)) != _norm(getattr(_DEFAULTS, f))]


def _norm(value):
    return str(value).lower() if isinstance(value, (bool, str)) else value


def refuse_unread(parallelism: ParallelismConfig, reads: Mapping[str, tuple[str, ...]],
                  notes: Mapping[str, str] | None = None) -> None:
    """ConfigError naming every set option that the chosen backend (``parallelism.name``) does not read.

    `reads`: each registered backend's name -> the options it reads (the chosen one among them).
    `notes`: the chosen backend's own word on an option it refuses, said after who reads it (why it
    cannot, what to use instead); without one, the message suggests the backend that reads it.
    """
    name = getattr(parallelism.name, "value", parallelism.name)
    bad = [f for f in changed(parallelism) if f not in reads.get(name, ())]
    if not bad:
        return
    notes = notes or {}
    by_reason: dict[str, list[str]] = {}
    for option in bad:
        by_reason.setdefault(_reason(option, reads, notes.get(option)), []).append(option)
    clauses = []
    for reason, options in by_reason.items():
        settings = ", ".join(f"parallelism.{f}={getattr(parallelism, f)!r}" for f in options)
        verb = "has" if len(options) == 1 else "have"
        clauses.append(f"{settings} {verb} no effect under parallelism={name} ({reason})")
    defaults = " ".join(f"parallelism.{f}={_yaml(getattr(_DEFAULTS, f))}" for f in bad)
    raise ConfigError(f"{'; '.join(clauses)}. Remove {'it' if len(bad) == 1 else 'them'} (default: {defaults}).")


def _reason(option: str, reads: Mapping[str, tuple[str, ...]], note: str | None) -> str:
    owners = [backend for backend, options in reads.items() if option in options]
    if not owners:  # register() refuses a descriptor naming a field that does not exist, not an unread field
        return f"no registered backend reads it; {note}" if note else "no registered backend reads it"
    said = f"read by {', '.join(owners)} only"
    return f"{said}; {note or 'use parallelism=' + ' or '.join(owners)}"


def _yaml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "{}" if value == {} else str(value)
