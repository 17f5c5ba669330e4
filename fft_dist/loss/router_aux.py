"""The Mixture-of-Experts router's load-balancing loss, as a loss term (``loss.terms.router_aux``).

It is active when the model's config asks for it (``output_router_logits`` and a non-zero
``router_aux_loss_coef``, set in ``model.arch`` or the model folder), as in transformers.
transformers adds ``coef x aux`` to each forward's mean loss. Our loss is a token sum over the whole
global batch, so each micro batch's aux loss (a mean) is weighted by its share of the global batch's
input (non-pad) tokens: the term is ``coef x sum_b(aux_b x n_b) / N``. It equals transformers' term
when the global batch is one micro batch, and it is the same on every backend that splits the batch
into the same micro batches (the sampler's split is contiguous and rank-ordered).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fft_dist.errors import ConfigError
from fft_dist.loss.terms import Contribution, LossInputs, TermContext, register_term


def router_aux_loss(output, config):
    """One micro batch's router aux loss (fp32) when the model's config asks for it; None otherwise."""
    aux = getattr(output, "aux_loss", None)
    if aux is None or not getattr(config, "output_router_logits", False):
        return None
    return aux.float()


@dataclass(frozen=True)
class RouterAux:
    weight: float
    name: str = "router_aux"
    unit: str = "inputs"
    needs: frozenset[str] = frozenset({"output", "model_config", "batch"})
    metric: str = "router_aux_loss"
    """The name metrics.jsonl has always used for it."""

    def __call__(self, inputs: LossInputs) -> Contribution | None:
        aux = router_aux_loss(inputs.output, inputs.model_config)
        if aux is None:
            return None
        return Contribution(aux, mean_over=int(inputs.batch["attention_mask"].sum()))


def make_router_aux(options: Mapping[str, Any], context: TermContext) -> RouterAux | None:
    if options:
        raise ConfigError(f"loss.terms.router_aux takes no options (got {sorted(options)}); its weight is the "
                          "model's router_aux_loss_coef (model.arch.router_aux_loss_coef)")
    config = context.model_config
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if not coef or not getattr(config, "output_router_logits", False):
        return None
    return RouterAux(weight=coef)


register_term("router_aux", make_router_aux)
