"""The training loss as a component: the data format's main term plus named terms (``loss:`` config).

- :mod:`.objectives`: each format's cross-entropy and the units it counts (tokens or examples).
- :mod:`.terms`: what a term is, the registry, and loading ``loss.plugins``.
- :mod:`.router_aux`: the MoE router's load-balancing loss, the built-in term.
- :mod:`.total`: the step's loss; the one place every part is normalised by its global count.
- :mod:`.chunked`: the token cross-entropy computed chunk by chunk with the output head (``loss.chunk_size``).
- :mod:`.kd`: distillation from a frozen reference (``loss.kd``), on full logits or chunk by chunk.
- :mod:`.l2sp`: the decoupled pull toward the starting weights (``loss.l2sp``), applied after each step.

Adding a term without forking: in your own module ::

    from fft_dist.loss import Contribution, register_term

    register_term("my_term", lambda options, context: MyTerm(**options))

then run with ``loss.plugins=[my_pkg.my_terms] +loss.terms.my_term={weight:0.1}``. The module is
imported by name (never a path: a malformed name is refused when the config is typed) on every rank
before training; an unknown term or a module that does not import is a config error (exit 2).
:func:`check` runs the same import and term checks without a model, for a launcher's preflight.
Each term's value is logged per step under its ``metric`` (``loss/<name>`` unless it says otherwise).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fft_dist.data.formats import get_format
from fft_dist.errors import ConfigError
from fft_dist.loss import router_aux as _router_aux  # noqa: F401 - registers the built-in term
from fft_dist.loss.objectives import (  # noqa: F401 - the package's API
    CLASSES,
    TOKENS,
    Objective,
    class_loss_sum,
    count_correct,
    count_examples,
    count_loss_tokens,
    token_loss_sum,
)
from fft_dist.loss.chunked import ChunkedHead, chunked_token_loss_sum  # noqa: F401
from fft_dist.loss.kd import Distillation, ReferenceRows, kl_logits_sum  # noqa: F401
from fft_dist.loss.router_aux import router_aux_loss  # noqa: F401
from fft_dist.loss.terms import (  # noqa: F401
    Contribution,
    LossInputs,
    Term,
    TermContext,
    build_terms,
    load_plugins,
    register_term,
    registered,
)
from fft_dist.loss.total import MAIN, StepLoss  # noqa: F401

if TYPE_CHECKING:
    from fft_dist.config import LossConfig


def objective_for(fmt: str) -> Objective:
    """The objective the data format names (its ``objective``: tokens or examples). Read at call time
    from this package, so tools such as bench/profile_*.py can wrap ``fft_dist.loss.TOKENS``."""
    return CLASSES if get_format(fmt).objective == CLASSES.unit else TOKENS


def build_loss(cfg: LossConfig, *, fmt: str, model_config: Any) -> StepLoss:
    """The run's loss: imports ``loss.plugins``, then builds the active ``loss.terms``."""
    load_plugins(list(cfg.plugins))
    objective = objective_for(fmt)
    terms = build_terms(cfg.terms, TermContext(model_config=model_config, objective_unit=objective.unit))
    kd = None
    if cfg.kd.weight:
        if objective.unit != TOKENS.unit:
            raise ConfigError(f"loss.kd.weight={cfg.kd.weight}: distillation compares next-token distributions, "
                              f"and data.format={fmt} trains a classification head; set loss.kd.weight=0")
        if cfg.kd.reference is not None and not (Path(cfg.kd.reference) / "config.json").is_file():
            raise ConfigError(f"loss.kd.reference={cfg.kd.reference!r} is not a Hugging Face model folder (no "
                              "config.json there)")
        kd = Distillation(weight=cfg.kd.weight, temperature=cfg.kd.temperature)
    return StepLoss(objective, terms, model_config, chunk_size=cfg.chunk_for(token_objective=objective.unit == TOKENS.unit),
                    kd=kd)


def check(cfg: LossConfig, *, fmt: str, model_config: Any = None) -> None:
    """A check for before any rank starts: the plugins import, every term is known and its options are
    valid. The model's config may be None there (not read yet); factories are built against it."""
    build_loss(cfg, fmt=fmt, model_config=model_config)
