"""L2-SP as a decoupled step (``loss.l2sp.weight``): after each optimizer step, theta <- theta - lr x lambda x
(theta - theta0) on each rank's own parameter ranges.

Decoupled, like AdamW's weight decay but toward theta0 instead of 0: added to the loss instead, Adam would
divide its gradient by the running second moment and the pull's strength would depend on each weight's
gradient history. theta0 is held beside theta as the same ranges the rank owns (a copy of its
``param`` fragments, taken before any step: the weights the run started from), so it costs the rank's
parameter shard once more and no communication; on a resume it is taken again from the freshly built model
(model.path or the seeded initial weights) before the checkpoint is loaded, so a resume stays exact.

The pull is written back through the strategy's own ``load_fragments`` (one source that serves the pulled
values of ``param`` ranges only), so every backend's write path is used as is: the local shard under
none / fsdp / hsdp, and under DeepSpeed the fp32 master partition, after which the engine refreshes its
working parameters. The logged value is lambda x ||theta - theta0||^2 after the pull, summed over ranks.
"""
from __future__ import annotations

from typing import Iterable

import torch

METRIC = "l2sp_loss"


class Anchor:
    """theta0 for this rank's ranges, and the pull toward it."""

    def __init__(self, weight: float, start: dict[tuple[str, int], torch.Tensor]):
        self.weight = weight
        self.start = start
        """(parameter name, flat start) -> a copy of that range of theta0 (the fragment's dtype)."""

    @classmethod
    def capture(cls, weight: float, fragments: Iterable) -> "Anchor":
        """theta0 from the strategy's ``fragments()`` now (call before any step and before a resume loads)."""
        return cls(weight, {(f.name, f.flat_start): f.local.detach().clone() for f in fragments if f.kind == "param"})

    def pull(self, strategy, lr: float) -> torch.Tensor:
        """theta <- theta - lr x lambda x (theta - theta0) on this rank's ranges (one step's pull); returns this
        rank's sum of ||theta - theta0||^2 after it (fp64, 0-dim, on the device; the caller sums over ranks)."""
        live = {(f.name, f.flat_start): f.local for f in strategy.fragments() if f.kind == "param"}
        missing = [k for k in live if k not in self.start]
        if missing:
            raise RuntimeError(f"loss.l2sp: this rank holds {missing[:3]} now but had no such range when theta0 was "
                               "taken (the strategy's ranges changed)")
        module = getattr(strategy, "module", None) or getattr(strategy, "model", None)  # DeepSpeed: the HF model
        source = _Pulled(live, self.start, lr * self.weight, dict(module.named_parameters()) if module else {})
        strategy.load_fragments(source)
        return source.squares if source.squares is not None else torch.zeros((), dtype=torch.float64)

    def value(self, squares: float) -> float:
        """The logged l2sp_loss from the ranks' summed squares."""
        return self.weight * squares


class _Pulled:
    """A FragmentSource serving the pulled value of each of this rank's ``param`` ranges (nothing else), read
    once each, as load_fragments reads them."""

    def __init__(self, live: dict, start: dict, rate: float, whole: dict):
        self.live, self.start, self.rate, self.whole = live, start, rate, whole
        """`whole`: name -> parameter, for what load_fragments reads beyond the rank's fragments (ZeRO-2 keeps a
        frozen parameter whole on every rank, owned by rank 0): served unchanged (no optimizer moves it)."""
        self.squares: torch.Tensor | None = None
        """fp64 on the parameters' device (no host sync per range)."""
        self._by_name: dict[str, list[int]] = {}
        for name, first in live:
            self._by_name.setdefault(name, []).append(first)

    def has(self, name: str, kind: str) -> bool:
        return kind == "param" and name in self._by_name

    def read(self, name: str, kind: str, start: int, stop: int) -> torch.Tensor:
        if kind == "param" and (name, start) not in self.live and name in self.whole \
                and not self.whole[name].requires_grad:
            return self.whole[name].detach().reshape(-1)[start:stop].clone()
        if kind != "param" or (name, start) not in self.live:
            raise KeyError(f"loss.l2sp: no range {name}[{start}:{stop}] ({kind}) on this rank")
        theta, theta0 = self.live[(name, start)], self.start[(name, start)]
        if theta.numel() != stop - start:
            raise KeyError(f"loss.l2sp: range {name}[{start}:{stop}] is not the one held ({theta.numel()} elements)")
        t = theta.detach().float()
        pulled = (t - self.rate * (t - theta0.float())).to(theta.dtype)
        part = (pulled.float() - theta0.float()).square().sum(dtype=torch.float64)
        self.squares = part if self.squares is None else self.squares + part.to(self.squares.device)
        return pulled
