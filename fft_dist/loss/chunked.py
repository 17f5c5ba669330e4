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
logits; in fp32 the two agree to round-off (tests/test_chunked_loss.py).
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
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            # the weight's gradient is summed over chunks in fp32, cast once at the end
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                stop = min(start + chunk, hidden.shape[0])
                h = hidden[start:stop].to(dtype)
                y = _logits(h, w, b, rules)
                factor = rules.grad_factor(y)  # soft-capping's derivative, before y becomes the softmax
                g = y.sub_(lse[start:stop, None]).exp_()  # softmax, in place
                g[rows[: stop - start], targets[start:stop]] -= 1.0  # d loss / d logits
                g.mul_(grad_total * rules.grad_scale if rules.grad_scale != 1.0 else grad_total)
                if factor is not None:
                    g.mul_(factor)
                del y, factor
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = (g @ w).to(grad_h.dtype)
                if grad_w is not None:
                    grad_w.add_(g.t() @ h)
                if grad_b is not None:
                    grad_b.add_(g.sum(0))
                del g, h
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


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
