"""New tokens: a vocabulary that grows, and the embedding rows that come with it.

``model.add_tokens`` (and the ``<|...|>`` markers a ``data.chat_template`` uses that the tokenizer
does not know) are added to the tokenizer as special tokens, so they are never split. The input
and output embeddings grow to the new vocabulary (``model.pad_vocab_to_multiple_of`` rounds it up),
and every new row starts as the mean of the old rows of that tensor.

The mean is computed from the source tensor itself, in float64, row chunk by row chunk, by every
rank that needs it (:class:`GrownVocabulary`), never from meta tensors or a ZeRO-3 partition: so
the new rows are bit-identical on every rank and backend, and parity holds. transformers'
``resize_token_embeddings(mean_resizing=True)`` instead draws each new row from a normal
distribution with the old rows' mean and covariance: random, so two backends (or two ranks)
would disagree unless they shared a generator.
"""
from __future__ import annotations

import re
from typing import Any

from fft_dist.errors import ConfigError

TEMPLATE_MARKER = re.compile(r"<\|[^|<>\s'\"]+\|>")
"""A chat template's special markers: <|im_start|>, <|start_header_id|> ..."""
MEAN_CHUNK_ROWS = 4096


def template_markers(template: str | None) -> list[str]:
    """The ``<|...|>`` markers a chat template writes, in order of appearance, once each."""
    found: list[str] = []
    for marker in TEMPLATE_MARKER.findall(template or ""):
        if marker not in found:
            found.append(marker)
    return found


def tokens_to_add(tokenizer, add_tokens: list[str], template: str | None) -> list[str]:
    """What to add: every model.add_tokens entry and every template marker the tokenizer would split
    (not a single token of its vocabulary), without duplicates or tokens it already has."""
    vocab = tokenizer.get_vocab()
    wanted = [*add_tokens, *template_markers(template)]
    out: list[str] = []
    for token in wanted:
        if not isinstance(token, str) or not token or token != token.strip():
            raise ConfigError(f"model.add_tokens: {token!r} is not a token (a non-empty string without surrounding "
                              "whitespace)")
        if token not in vocab and token not in out:
            out.append(token)
    return out


def add_tokens(tokenizer, tokens: list[str]) -> int:
    """Add `tokens` as special tokens (never split, kept whole when decoding); the new length."""
    if tokens:
        tokenizer.add_tokens(tokens, special_tokens=True)
    return len(tokenizer)


def grown_vocab_size(model_vocab: int, tokenizer_len: int, multiple: int) -> int:
    """The embedding rows the model needs: the tokenizer's length (never fewer than the model has),
    rounded up to `multiple` (0: no rounding)."""
    size = max(model_vocab, tokenizer_len)
    if multiple > 0:
        size = -(-size // multiple) * multiple
    return size


class GrownVocabulary:
    """A FragmentSource over a model folder whose embeddings have `old_rows` rows, serving the grown
    model: rows below `old_rows` from the folder, every row from `old_rows` on the mean of the old
    rows of that tensor. `grown`: parameter name -> its new full shape (rows first)."""

    def __init__(self, source: Any, grown: dict[str, tuple[int, ...]], *, old_rows: int):
        self._source, self._grown, self._old = source, grown, old_rows
        self._means: dict[str, Any] = {}

    def has(self, name: str, kind: str) -> bool:
        return self._source.has(name, kind)

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self._grown and self._source.shape(name) is not None:
            return self._grown[name]
        return self._source.shape(name)

    def close(self) -> None:
        self._source.close()

    def read(self, name: str, kind: str, start: int, stop: int):
        if name not in self._grown:
            return self._source.read(name, kind, start, stop)
        import torch

        row = 1
        for d in self._grown[name][1:]:
            row *= int(d)
        split = self._old * row  # the first flat element of a new row
        parts = []
        if start < split:
            parts.append(self._source.read(name, kind, start, min(stop, split)))
        if stop > split:
            mean = self._mean(name, row)
            first = max(start, split)
            offset = (first - split) % row
            count = stop - first
            reps = -(-(offset + count) // row)
            parts.append(mean.repeat(reps)[offset:offset + count])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _mean(self, name: str, row: int):
        """The mean of the tensor's old rows, summed in float64 in chunks of rows, in the file's dtype."""
        if name not in self._means:
            import torch

            total = torch.zeros(row, dtype=torch.float64)
            dtype = None
            for r0 in range(0, self._old, MEAN_CHUNK_ROWS):
                r1 = min(self._old, r0 + MEAN_CHUNK_ROWS)
                chunk = self._source.read(name, "param", r0 * row, r1 * row)
                dtype = chunk.dtype
                total += chunk.reshape(r1 - r0, row).to(torch.float64).sum(0)
            self._means[name] = (total / self._old).to(dtype or torch.float32)
        return self._means[name]
