"""Next-token cross-entropy whose memory does not grow with tokens x vocabulary (``loss.chunk_size``).

The output projection and the loss run ``chunk_size`` loss-bearing tokens at a time: a chunk's logits
[chunk, vocab] exist only while that chunk is computed. Only the rows whose label counts go through the
head at all (a prompt masked with -100 costs no vocabulary-sized work).

Backward recomputes each chunk's logits rather than keeping anything from forward: forward saves the
hidden rows (already alive: the body's output), the labels and one fp32 log-sum-exp per token. The
alternative (Liger, Cut Cross-Entropy: each chunk's gradient computed in forward) would hold a
vocabulary x hidden weight gradient from forward to backward and produce that gradient in forward, where
no backend expects it: FSDP2 reduce-scatters and ZeRO-3 partitions a weight's gradient in backward, with
the weight gathered by the hooks on the output embedding's call (fft_dist.models.head.deferred_head).
Recomputing costs one more [chunk, hidden] x [hidden, vocab] product per chunk, a small part of a step.

The family's head rules (fft_dist.models.head.HeadRules: soft-capping, logit scaling) are applied to each
chunk in fp32, then the loss in fp32, as :func:`fft_dist.loss.objectives.token_loss_sum` does on full
logits; in fp32 the two agree to round-off (tests/unit/test_chunked_loss.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fft_dist.data.encode import IGNORE_INDEX
from fft_dist.models.head import HeadRules


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the projection runs in: autocast's where it is on (as it would be for the model's head)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rules: HeadRules) -> torch.Tensor:
    """One chunk's logits in fp32, with the family's rules applied (a fresh tensor the caller owns)."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    return rules.apply_(z.float() if z.dtype != torch.float32 else z)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows of cross-entropy(rules(hidden W^T + b), target), chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rules: HeadRules, chunk: int, dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                stop = min(start + chunk, hidden.shape[0])
                y = _logits(hidden[start:stop].to(dtype), w, b, rules)
                lse[start:stop] = torch.logsumexp(y, dim=-1)
                picked = y.gather(1, targets[start:stop, None]).squeeze(1)
                total += (lse[start:stop] - picked).sum()
                del y
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.rules, ctx.chunk, ctx.dtype = rules, chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        rules, chunk, dtype = ctx.rules, ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        # 16-bit compute over several chunks: the weight's gradient by vocabulary blocks (all tokens at once), so
        # it is rounded once, as the full-logits matmul does, and no fp32 vocabulary x hidden sum is held
        by_vocab = (need_w or need_b) and dtype != torch.float32 and n > chunk
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = grad_b = None
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                h = hidden[start:stop].to(dtype)
                g = _grad_logits(_logits(h, w, b, rules), lse[start:stop], targets[start:stop], 0, grad_total,
                                 rules)
                if need_b and not by_vocab:
                    part = g.sum(0)
                    grad_b = part if grad_b is None else grad_b.add_(part)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = (g @ w).to(grad_h.dtype)
                if need_w and not by_vocab:  # fp32 (the sum is the gradient itself), or 16-bit in one chunk
                    part = g.t() @ h
                    grad_w = part if grad_w is None else grad_w.add_(part)
                del g, h
            if by_vocab:
                grad_w, grad_b = _weight_grad_by_vocab(hidden.to(dtype), w, b, lse, targets, grad_total, rules,
                                                       block=max(1, chunk * vocab // max(n, 1)), need_w=need_w,
                                                       need_b=need_b)
        if need_w and grad_w is None:  # no loss-bearing token
            grad_w = torch.zeros_like(weight)
        if need_b and grad_b is None:
            grad_b = torch.zeros_like(bias)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _grad_logits(y: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, first: int, grad_total: torch.Tensor,
                 rules: HeadRules) -> torch.Tensor:
    """d loss / d projection for fp32 logits `y` (the rules applied) of vocabulary columns first.. (in place of y)."""
    factor = rules.grad_factor(y)  # soft-capping's derivative, taken before y becomes the softmax
    g = y.sub_(lse[:, None]).exp_()  # softmax
    inside = (targets >= first) & (targets < first + g.shape[1])
    g.scatter_add_(1, (targets - first).clamp_(0, g.shape[1] - 1)[:, None], -inside.to(g.dtype)[:, None])
    g.mul_(grad_total * rules.grad_scale if rules.grad_scale != 1.0 else grad_total)
    if factor is not None:
        g.mul_(factor)
    return g


def _weight_grad_by_vocab(hidden, w, b, lse, targets, grad_total, rules: HeadRules, *, block: int, need_w: bool,
                          need_b: bool):
    """The weight's (and bias's) gradient, `block` vocabulary rows at a time over every token: [tokens, block]
    logits recomputed per block, each row of the gradient one matmul."""
    grad_w = torch.empty_like(w) if need_w else None
    grad_b = torch.empty(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
    for first in range(0, w.shape[0], block):
        last = min(first + block, w.shape[0])
        y = _logits(hidden, w[first:last], None if b is None else b[first:last], rules)
        g = _grad_logits(y, lse, targets, first, grad_total, rules)
        if grad_b is not None:
            grad_b[first:last] = g.sum(0)
        if grad_w is not None:
            grad_w[first:last] = g.to(w.dtype).t() @ hidden
        del g, y
    return grad_w, grad_b


def chunked_token_loss_sum(hidden: torch.Tensor, embedding: nn.Module, rules: HeadRules, labels: torch.Tensor,
                           chunk: int) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not ignored (fp32), from the last hidden
    state [batch, seq, hidden] and the output embedding (its weight usable: see deferred_head). Equal to
    :func:`fft_dist.loss.objectives.token_loss_sum` of the family's logits."""
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    keep = (next_labels != IGNORE_INDEX).nonzero().squeeze(1)  # on the host: labels come from the CPU loader
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep.to(hidden.device))
    targets = next_labels[keep].to(hidden.device)
    weight = embedding.weight
    bias = getattr(embedding, "bias", None)
    dtype = _compute_dtype(hidden.device, weight.dtype)
    return _ChunkedCrossEntropy.apply(rows, weight, bias, targets, rules, max(1, int(chunk)), dtype)


class ChunkedHead:
    """The head :func:`fft_dist.models.head.deferred_head` runs for one micro batch: its token loss sum."""

    def __init__(self, labels: torch.Tensor, chunk: int):
        self.labels, self.chunk = labels, chunk

    def __call__(self, hidden: torch.Tensor, embedding: nn.Module, rules: HeadRules) -> torch.Tensor:
        return chunked_token_loss_sum(hidden, embedding, rules, self.labels, self.chunk)
