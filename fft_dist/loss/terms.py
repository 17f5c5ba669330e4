"""What a loss term is, and the one registry every term (built-in or a user's plugin) goes through.

A term is added to the data format's main cross-entropy. It is built once per run by a factory
``factory(options, context) -> Term | None`` (None: not active for this model, e.g. the router's
loss on a dense model) and called once per micro batch with :class:`LossInputs`. It returns a
:class:`Contribution` and never normalises itself: :mod:`fft_dist.loss.total` divides by the global
count of the term's unit, so every term is independent of how the batch is split.

A term declares what it reads in ``needs``. The loop provides :data:`PROVIDED` today; a term that
needs more (a frozen reference model's logits, the pretrained weights) is refused before training
until the strategy hosts such a model, instead of failing mid-run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch

from fft_dist.plugins import import_modules
from fft_dist.errors import ConfigError

PROVIDED = frozenset({"batch", "output", "model_config"})
"""What :class:`LossInputs` carries in this version (every term may read these)."""
FUTURE = frozenset({"reference_logits", "reference_params"})
"""Names reserved for terms that need a second, frozen model or the starting weights."""
UNITS = ("tokens", "examples", "inputs")
"""What a term's contribution is normalised by: the objective's loss tokens or examples, or the
non-pad input tokens of the global batch."""


@dataclass(frozen=True)
class TermContext:
    """What a factory may look at when it builds its term (once per run, on every rank)."""

    model_config: Any
    """The transformers config of the model being trained; None in a check before launch (not read yet)."""
    objective_unit: str
    """'tokens' or 'examples': the unit of the format's main term."""


@dataclass
class LossInputs:
    """One micro batch, as every term sees it."""

    batch: dict
    output: Any
    """The model's forward output (``.logits``, and ``.aux_loss`` for MoE models). Under loss.chunk_size no full
    logits exist: reading ``.logits`` is then a config error naming the term."""
    model_config: Any
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Future inputs by name (see FUTURE); empty today."""


@dataclass
class Contribution:
    """A term's value on one micro batch, before normalisation."""

    value: torch.Tensor
    """A sum over the micro batch's units, or their mean when ``mean_over`` is set."""
    mean_over: int | None = None
    """The units the mean was taken over: the term then weighs ``value x mean_over / N``."""


class Term(Protocol):
    name: str
    unit: str
    """One of UNITS: what the global count N that divides this term counts."""
    weight: float
    """The coefficient the normalised term is added to the loss with (the metric is logged unweighted)."""
    needs: frozenset[str]
    metric: str
    """The metrics.jsonl key of the term's normalised, unweighted value per step."""

    def __call__(self, inputs: LossInputs) -> Contribution | None: ...


Factory = Callable[[Mapping[str, Any], TermContext], "Term | None"]
_FACTORIES: dict[str, Factory] = {}


def register_term(name: str, factory: Factory) -> None:
    """Make ``loss.terms.<name>`` available. Call it at import time of your module, and name the
    module in ``loss.plugins`` so every rank (and the launcher's checks) imports it."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"loss term name {name!r}: use lower-case letters, digits and _")
    if name in _FACTORIES and _FACTORIES[name] is not factory:
        raise ValueError(f"loss term {name!r} is registered twice")
    _FACTORIES[name] = factory


def registered() -> list[str]:
    return sorted(_FACTORIES)


def load_plugins(plugins: list[str]) -> None:
    """Import each ``loss.plugins`` module (it registers its terms or formats) by :mod:`fft_dist.plugins`' rule."""
    import_modules(list(plugins), "loss.plugins")


def build_terms(terms: Mapping[str, Mapping[str, Any]], context: TermContext) -> list[Term]:
    """The active terms of ``loss.terms`` in a fixed (sorted) order; unknown names are a ConfigError."""
    unknown = [n for n in terms if n not in _FACTORIES]
    if unknown:
        raise ConfigError(f"loss.terms: unknown term(s) {unknown}; registered: {registered()} "
                          "(a term of your own: register_term in a module named in loss.plugins)")
    built = []
    for name in sorted(terms):
        term = _FACTORIES[name](dict(terms[name] or {}), context)
        if term is None:
            continue
        missing = set(term.needs) - PROVIDED
        if missing:
            raise ConfigError(f"loss.terms.{name} needs {sorted(missing)}, which this version of the loop does "
                              f"not provide (it provides {sorted(PROVIDED)})")
        allowed = (context.objective_unit, "inputs")
        if term.unit not in allowed:
            raise ConfigError(f"loss.terms.{name} is normalised by {term.unit!r}, which this data format does "
                              f"not count (it counts {allowed})")
        built.append(term)
    return built
