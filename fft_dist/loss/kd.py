"""Distillation from a frozen reference (``loss.kd``): T^2 x KL(reference || model) per loss-bearing token.

For a token with model logits z and reference logits r (each with its family's head rules applied), with
p = softmax(r / T) and q = softmax(z / T), the term is ``T^2 x sum_v p_v (log p_v - log q_v)``; summed over
the tokens whose next label counts (the cross-entropy's tokens) and divided by their global count in
:mod:`fft_dist.loss.total`. Its gradient in z is ``T (q - p)``: the T^2 keeps that scale independent of T
(Hinton et al.), so a weight chosen at one temperature stays meaningful at another. The model is pulled
toward what the reference predicts; the reference gets no gradient.

Two ways, as the cross-entropy: on the full logits (``loss.chunk_size=0``: :func:`kl_logits_sum`), or chunk
by chunk (:func:`chunked_kl_sum`), where neither model's tokens x vocabulary logits ever exist: the reference's
forward runs first with :class:`ReferenceRows` as its head (its last hidden rows of the loss-bearing tokens,
and a copy of its output embedding while the backend has it gathered: vocabulary x hidden, once per micro
batch), then the model's head computes both chunks' logits, and backward recomputes them. Costs beside the
cross-entropy's: the model's chunk logits are computed again for the KL (one more head matmul in forward and
one in backward; a fused kernel could share them), the reference's head matmul twice, and in backward an
fp32 vocabulary x hidden accumulator for the weight's gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fft_dist.data.encode import IGNORE_INDEX
from fft_dist.loss.chunked import _compute_dtype, _logits, chunked_token_loss_sum
from fft_dist.models.head import HeadRules

METRIC = "kd_loss"


def _next_labels(labels: torch.Tensor) -> torch.Tensor:
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def kl_logits_sum(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, temperature: float
                  ) -> torch.Tensor:
    """T^2 x sum over loss-bearing positions of KL(softmax(reference / T) || softmax(logits / T)), in fp32, from
    full [batch, seq, vocab] logits (the model's, with grad; the reference's, without)."""
    keep = (_next_labels(labels) != IGNORE_INDEX).nonzero().squeeze(1).to(logits.device)
    z = logits.reshape(-1, logits.shape[-1]).index_select(0, keep)
    r = reference.reshape(-1, reference.shape[-1]).to(logits.device).index_select(0, keep)
    return _FullKL.apply(z, r.detach(), float(temperature))


class _FullKL(torch.autograd.Function):
    """T^2 KL(p || q) summed over rows of full logits, with its gradient T (q - p) computed from the same
    log-probabilities as the value: a model against itself gets exactly 0 (autograd's log-softmax would not)."""

    @staticmethod
    def forward(ctx, z, r, temperature: float):
        log_q, _ = _scaled_log_softmax_(z.float().clone() if z.dtype == torch.float32 else z.float(), temperature)
        log_p, _ = _scaled_log_softmax_(r.float().clone() if r.dtype == torch.float32 else r.float(), temperature)
        total = (log_p.exp() * (log_p - log_q)).sum() * (temperature * temperature)
        ctx.save_for_backward(log_q, log_p)
        ctx.temperature, ctx.dtype = temperature, z.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        log_q, log_p = ctx.saved_tensors
        g = log_q.exp().sub_(log_p.exp()).mul_(grad_total * ctx.temperature)
        return g.to(ctx.dtype), None, None


@dataclass
class RefChunks:
    """What the chunked KL reads of the reference for one micro batch (no gradient anywhere)."""

    rows: torch.Tensor
    """Its last hidden state at the loss-bearing tokens [n, hidden]."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    rules: HeadRules


class ReferenceRows:
    """The head for the reference's forward (``head=`` of its forward): keeps the loss-bearing tokens' hidden
    rows and a copy of the output embedding's (gathered) weight; returns a zero, so no logits are made."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.result: RefChunks | None = None

    def __call__(self, hidden: torch.Tensor, embedding: nn.Module, rules: HeadRules) -> torch.Tensor:
        keep = (_next_labels(self.labels) != IGNORE_INDEX).nonzero().squeeze(1).to(hidden.device)
        bias = getattr(embedding, "bias", None)
        self.result = RefChunks(hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep).detach(),
                                embedding.weight.detach().clone(),  # a sharded backend frees it after the call
                                None if bias is None else bias.detach().clone(), rules)
        return hidden.new_zeros(())


def _scaled_log_softmax_(y: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(y / T), logsumexp(y / T)), overwriting y."""
    y.div_(temperature)
    lse = torch.logsumexp(y, dim=-1)
    return y.sub_(lse[:, None]), lse


class _ChunkedKL(torch.autograd.Function):
    """T^2 x sum of KL(p || q) over rows, chunk by chunk; backward recomputes both chunks' logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref: RefChunks, rules: HeadRules, temperature: float, chunk: int,
                dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            lse_q = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                stop = min(start + chunk, hidden.shape[0])
                log_q, lse_q[start:stop] = _scaled_log_softmax_(_logits(hidden[start:stop].to(dtype), w, b, rules),
                                                                temperature)
                log_p, _ = _scaled_log_softmax_(_ref_logits(ref, start, stop, hidden.device), temperature)
                total += (log_p.exp() * (log_p - log_q)).sum()
                del log_q, log_p
        ctx.save_for_backward(hidden, weight, bias, lse_q)
        ctx.ref, ctx.rules, ctx.temperature, ctx.chunk, ctx.dtype = ref, rules, temperature, chunk, dtype
        return total * (temperature * temperature)

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, lse_q = ctx.saved_tensors
        ref, rules, t, chunk, dtype = ctx.ref, ctx.rules, ctx.temperature, ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
            for start in range(0, hidden.shape[0], chunk):
                stop = min(start + chunk, hidden.shape[0])
                h = hidden[start:stop].to(dtype)
                y = _logits(h, w, b, rules)
                factor = rules.grad_factor(y)
                q = y.div_(t).sub_(lse_q[start:stop, None]).exp_()
                log_p, _ = _scaled_log_softmax_(_ref_logits(ref, start, stop, hidden.device), t)
                g = q.sub_(log_p.exp_()).mul_(grad_total * t * rules.grad_scale)  # d/dy of T^2 KL: T (q - p)
                if factor is not None:
                    g.mul_(factor)
                if grad_b is not None:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = (g @ w).to(grad_h.dtype)
                if grad_w is not None:
                    grad_w += (g.t() @ h).float()
                del g, h, y, log_p
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def _ref_logits(ref: RefChunks, start: int, stop: int, device) -> torch.Tensor:
    dtype = _compute_dtype(ref.rows.device, ref.weight.dtype)
    w = ref.weight.to(dtype)
    return _logits(ref.rows[start:stop].to(device, dtype), w, None if ref.bias is None else ref.bias.to(dtype),
                   ref.rules)


def chunked_kl_sum(rows: torch.Tensor, embedding_weight: torch.Tensor, embedding_bias: torch.Tensor | None,
                   rules: HeadRules, ref: RefChunks, temperature: float, chunk: int) -> torch.Tensor:
    """:func:`kl_logits_sum` from the model's hidden rows at the loss-bearing tokens (the same rows, in the same
    order, as ``ref.rows``) and its output embedding, `chunk` rows at a time (see the module docstring)."""
    if rows.shape[0] != ref.rows.shape[0]:
        raise RuntimeError(f"kd: the model has {rows.shape[0]} loss-bearing rows, the reference {ref.rows.shape[0]}")
    dtype = _compute_dtype(rows.device, embedding_weight.dtype)
    return _ChunkedKL.apply(rows, embedding_weight, embedding_bias, ref, rules, float(temperature),
                            max(1, int(chunk)), dtype)


@dataclass(frozen=True)
class Distillation:
    """The run's distillation part: its weight and temperature (``loss.kd``)."""

    weight: float
    temperature: float
    name: str = "kd"
    metric: str = METRIC


class ChunkedHeadWithKD:
    """The model's head under loss.chunk_size with distillation: [cross-entropy sum, T^2 KL sum] (a 2-vector),
    both chunk by chunk inside the output embedding's call (its weight gathered)."""

    def __init__(self, labels: torch.Tensor, chunk: int, ref: RefChunks, temperature: float):
        self.labels, self.chunk, self.ref, self.temperature = labels, chunk, ref, temperature

    def __call__(self, hidden: torch.Tensor, embedding: nn.Module, rules: HeadRules) -> torch.Tensor:
        ce = chunked_token_loss_sum(hidden, embedding, rules, self.labels, self.chunk)
        keep = (_next_labels(self.labels) != IGNORE_INDEX).nonzero().squeeze(1).to(hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
        kd = chunked_kl_sum(rows, embedding.weight, getattr(embedding, "bias", None), rules, self.ref,
                            self.temperature, self.chunk)
        return torch.stack([ce, kd])


class Reference:
    """The frozen reference as the loop uses it: for each micro batch, what the distillation part reads (the
    reference's :class:`RefChunks` under loss.chunk_size, else its full logits), from the same inputs."""

    def __init__(self, frozen, *, chunked: bool):
        self.frozen, self.chunked = frozen, chunked
        """`frozen`: a FrozenModel (fft_dist.strategy.base) the strategy hosts."""

    def for_batch(self, batch: dict):
        inputs = (batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        if not self.chunked:
            return self.frozen.forward(*inputs).logits
        rows = ReferenceRows(batch["labels"])
        self.frozen.forward(*inputs, head=rows)
        return rows.result
