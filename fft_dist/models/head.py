"""The output head of a causal LM, taken out of the model's forward so a loss can apply it chunk by chunk.

A family's logits are ``rules(output_embedding(last_hidden))``. transformers applies the family's rules
after the output projection inside the model's forward: Gemma-2/3's final logit soft-capping
(``final_logit_softcapping``), Granite's division by ``logits_scaling``, Cohere's multiplication by
``logit_scale``. :class:`HeadRules` holds them, read from the model's own config.

:func:`deferred_head` makes a forward return the head's result instead of logits: the model's forward runs
as usual (a Mixture-of-Experts model still computes its router loss) with the output embedding replaced
by a probe that records its input (the last hidden state, after any family scaling before the head) and
returns a small constant row; then the output embedding module itself is called with its forward set to
the head function. So the head runs inside the top module's call (FSDP2's root hooks have its weight
gathered) and inside the output embedding's own call (DeepSpeed ZeRO-3 gathers its weight there, and
again in backward through the hooks it puts on that call's output). The probe row comes back through the
family's own post-processing, which is checked once per model against :class:`HeadRules`: a family
whose head does something the rules do not know is refused instead of trained with the wrong loss.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fft_dist.errors import ConfigError
from fft_dist.models.family import text_config

Head = Callable[[torch.Tensor, nn.Module, "HeadRules"], torch.Tensor]
"""(last hidden state [batch, seq, hidden], the output embedding with its weight usable, the rules) -> result."""
RESULT_KEY = "loss"
"""Where the head's result is put in the model's output (a field every causal-LM output has)."""
_VERIFIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass(frozen=True)
class HeadRules:
    """What the family does to the output projection's result, in this order (each 1.0 / None: nothing)."""

    multiply: float = 1.0
    """Cohere: ``logit_scale``."""
    divide: float = 1.0
    """Granite: ``logits_scaling``."""
    softcap: float | None = None
    """Gemma-2 / 3: ``final_logit_softcapping``: ``cap * tanh(logits / cap)``."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's logits from the projection's (the same operations, in the same order, as transformers)."""
        if self.multiply != 1.0:
            logits = logits * self.multiply
        if self.divide != 1.0:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` in place (a chunk of fp32 logits the loss owns)."""
        if self.multiply != 1.0:
            logits.mul_(self.multiply)
        if self.divide != 1.0:
            logits.div_(self.divide)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def grad_factor(self, logits: torch.Tensor) -> torch.Tensor | None:
        """d logits / d projection where it is not a constant (soft-capping: 1 - (logits / cap)^2, a new tensor);
        None otherwise. `logits` are the rules' output."""
        if self.softcap is None:
            return None
        return (logits / self.softcap).square_().neg_().add_(1.0)

    @property
    def grad_scale(self) -> float:
        """The constant part of d logits / d projection (multiply / divide)."""
        return self.multiply / self.divide


def head_rules(config: Any) -> HeadRules:
    """The family's head rules from its config (the values the model's own forward reads)."""
    config = text_config(config)

    def number(name: str) -> float | None:
        value = getattr(config, name, None)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value else None

    return HeadRules(multiply=number("logit_scale") or 1.0, divide=number("logits_scaling") or 1.0,
                     softcap=number("final_logit_softcapping"))


def output_embedding(model: nn.Module) -> nn.Module:
    """The module that projects the last hidden state onto the vocabulary (a tied one included)."""
    module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(module, "weight", None)
    shape = getattr(weight, "ds_shape", getattr(weight, "shape", ()))  # ZeRO-3 keeps the full shape in ds_shape
    if not isinstance(module, nn.Module) or not isinstance(weight, torch.Tensor) or len(shape) != 2:
        raise ConfigError(f"loss.chunk_size: {type(model).__name__} has no linear output embedding to apply chunk by "
                          "chunk; set loss.chunk_size=0")
    return module


def _parent_of(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        for attr, sub in module.named_children():
            if sub is child:
                return module, attr
    raise ConfigError(f"loss.chunk_size: the output embedding of {type(model).__name__} is not one of its submodules; "
                      "set loss.chunk_size=0")


class _Probe(nn.Module):
    """Stands in for the output embedding inside the model's forward: records the hidden state it is given
    and returns a constant row that the family's post-processing turns into what :func:`check_rules` reads."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = row
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return self.row


def probe_row(vocab: int, device) -> torch.Tensor:
    """A [1, 1, vocab] fp32 ramp over [-100, 100]: soft-capping and scaling change it measurably."""
    return torch.linspace(-100.0, 100.0, vocab, device=device, dtype=torch.float32).view(1, 1, vocab)


def rules_hold(model: nn.Module, row: torch.Tensor, produced: Any, rules: HeadRules) -> bool:
    """Whether the family's forward turned the probe row into what `rules` say (remembered once true)."""
    if model in _VERIFIED:
        return True
    expected = rules.apply(row)
    ok = isinstance(produced, torch.Tensor) and produced.shape == expected.shape and torch.allclose(
        produced.detach().float(), expected, rtol=8e-3, atol=1e-3)  # a 16-bit cast of the logits passes
    if ok:
        _VERIFIED.add(model)
    return ok


def check_rules(model: nn.Module, row: torch.Tensor, produced: Any, rules: HeadRules) -> None:
    """Once per model: the family's forward turned the probe row into what `rules` say (else: refused)."""
    if not rules_hold(model, row, produced, rules):
        raise ConfigError(
            f"loss.chunk_size: {type(model).__name__} changes its logits after the output projection in a way fft-dist's "
            f"head rules ({rules}) do not reproduce, so the chunked loss would differ from the model's; set "
            "loss.chunk_size=0 (or teach fft_dist/models/head.py the family's rule)")


class RulesCheck:
    """A head that computes nothing and only records (in :attr:`holds`) whether chunking reproduces the
    family's logits: how ``loss.chunk_size=auto`` decides, before training, whether it may chunk, where an
    explicit size is refused instead (:func:`check_rules`)."""

    def __init__(self) -> None:
        self.holds: bool | None = None

    def __call__(self, hidden: torch.Tensor, embedding: nn.Module, rules: HeadRules) -> torch.Tensor:
        return hidden.new_zeros(())


def chunking_holds(forward: Callable[..., Any], device: torch.device | str) -> bool:
    """One no-grad forward of a 2-token row through `forward` (a Strategy's) with a :class:`RulesCheck`:
    True when the family's head rules reproduce its logits. Collective where `forward` is."""
    check = RulesCheck()
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        forward(ids, torch.ones_like(ids), head=check)
    return bool(check.holds)


@contextlib.contextmanager
def deferred_head(model: nn.Module, head: Head | None):
    """Within: calling `model` (through whatever wraps it) returns its usual output with ``.logits`` None
    and ``output[RESULT_KEY]`` = ``head(last_hidden, output_embedding, rules)`` (see the module
    docstring). With `head` None, nothing changes."""
    if head is None:
        yield
        return
    try:
        embedding = output_embedding(model)
        parent, attr = _parent_of(model, embedding)
    except ConfigError:
        if not isinstance(head, RulesCheck):
            raise
        head.holds = False  # nothing to chunk: the forward runs as it is
        yield
        return
    rules = head_rules(model.config)
    weight = embedding.weight
    vocab = int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 keeps the full shape in ds_shape

    def forward(*args, **kwargs):
        probe = _Probe(probe_row(vocab, weight.device))
        setattr(parent, attr, probe)
        try:
            out = original(*args, **kwargs)
        finally:
            setattr(parent, attr, embedding)
        if isinstance(head, RulesCheck):  # asked, not enforced: loss.chunk_size=auto
            head.holds = probe.hidden is not None and rules_hold(model, probe.row, out.logits, rules)
            return out
        if probe.hidden is None:
            raise ConfigError(f"loss.chunk_size: {type(model).__name__}'s forward did not call its output embedding; "
                              "set loss.chunk_size=0")
        check_rules(model, probe.row, out.logits, rules)
        out["logits"] = None  # no full logits exist: a loss term that reads them fails instead of reading the probe
        with _instance_forward(embedding, lambda hidden: head(hidden, embedding, rules)):
            out[RESULT_KEY] = embedding(probe.hidden)  # the embedding's own call: its backend hooks run
        return out

    original = model.forward
    with _instance_forward(model, forward):
        yield


@contextlib.contextmanager
def _instance_forward(module: nn.Module, forward: Callable):
    """`module.forward` is `forward` within (nn.Module's call, and every hook on it, runs around it)."""
    before = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before
