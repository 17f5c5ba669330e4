"""Turn rows into token ids and labels (-100 where no loss falls): what every data format shares.

Runs inside `datasets.map` (batched, maybe in worker processes), so it is a plain function of a
batch: every input row yields one output row per window, each with `dropped` saying why it
cannot be trained ('' when it can). The pipeline counts those reasons, then filters the rows.
How a row of one format becomes tokens is that format's `encode` (fft_dist/data/formats/); the
:class:`Encoder` calls it and gives it the emit helpers, so truncation and the drop rule stay one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fft_dist.config import DataConfig
from fft_dist.data.chat_template import chat_template_file  # noqa: F401 - read by fft_dist.model
from fft_dist.errors import ConfigError

IGNORE_INDEX = -100
OUT_COLUMNS = ("input_ids", "labels", "loss_tokens", "truncated", "windowed", "dropped")


@dataclass
class Encoder:
    """Batch encoder for `datasets.map(batched=True, with_indices=True)`; `name_row(i)` names row i."""

    cfg: DataConfig
    tok: object
    name_row: Callable[[int], str]
    chat_template: str | None = None
    """The format's resolved template (Format.template), if it has one."""
    labels: tuple[str, ...] = ()
    """classification: the label set (class id = position)."""
    fmt: Any = None
    """The :class:`fft_dist.data.formats.Format` whose `encode` turns the rows into examples."""
    _specials: tuple | None = field(default=None, repr=False)

    @property
    def specials(self) -> tuple[list[int], list[int]]:
        """(ids before an example, ids after it) under data.add_bos / data.add_eos (worked out once)."""
        if self._specials is None:
            self._specials = special_tokens(self.tok, self.cfg)
        return self._specials

    def with_bos(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """The example with the BOS tokens in front (no loss on them), unless it already starts with them
        (a chat template that renders its own BOS, text that begins with it): never two."""
        bos = self.specials[0]
        if not bos or list(ids[: len(bos)]) == bos:
            return list(ids), list(labels)
        return bos + list(ids), [IGNORE_INDEX] * len(bos) + list(labels)

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        out = {k: [] for k in OUT_COLUMNS}
        self.fmt.encode(self, batch, list(indices), out)
        return out

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without the tokenizer's special tokens."""
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def append(self, out: dict, row: tuple) -> None:
        """One output row, given in OUT_COLUMNS order."""
        for key, value in zip(OUT_COLUMNS, row):
            out[key].append(value)

    def emit(self, out: dict, ids: list[int], labels: list[int], *, windowed: bool = False) -> None:
        """One example, truncated to data.max_length; dropped (with its reason) when no loss is left."""
        n = self.cfg.max_length
        truncated = len(ids) > n
        ids, labels = list(ids[:n]), list(labels[:n])
        loss = sum(1 for t in labels[1:] if t != IGNORE_INDEX)  # labels[0] is never predicted
        reason = "" if loss else ("no loss tokens left after truncation" if truncated else "no loss tokens")
        self.append(out, (ids, labels, loss, truncated, windowed, reason))

    def skip(self, out: dict, reason: str) -> None:
        """A row that yields no example, counted under `reason` (e.g. the chat template refused it)."""
        self.append(out, ([], [], 0, False, False, reason))

    def emit_plain(self, out: dict, pairs: list, *, windows: bool) -> None:
        """(context ids, target ids) pairs: BOS first (data.add_bos), loss on the target and the EOS after it
        (data.add_eos); with `windows` a longer sequence becomes data.stride windows, each with the BOS first."""
        bos, eos = self.specials
        for prompt, target in pairs:
            body, context = list(prompt) + list(target), len(prompt)
            if bos and body[: len(bos)] == bos:  # the text wrote its own BOS: it is the one every example gets
                body, context = body[len(bos):], max(context - len(bos), 0)
            if eos and body[len(body) - len(eos):] != eos:
                body += eos
            ids, labels = bos + body, [IGNORE_INDEX] * (len(bos) + context) + body[context:]
            head = len(bos)
            if windows and len(ids) > self.cfg.max_length:
                length = max(self.cfg.max_length - head, 1)
                for w_ids, w_labels in sliding_windows(body, length, min(self.cfg.stride, length)):
                    self.emit(out, ids[:head] + w_ids, labels[:head] + w_labels, windowed=True)
            else:
                self.emit(out, ids, labels)


SPECIAL_CHOICES = ("auto", "true", "false")


def special_tokens(tok, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(ids put before each example, ids after it). auto follows the tokenizer: what `tok(text)` adds around
    a text (its add_bos_token or post-processor); an EOS that it does not add is appended all the same,
    since the EOS at the end of an example is what teaches the model to stop."""
    for key in ("add_bos", "add_eos"):
        if getattr(cfg, key) not in SPECIAL_CHOICES:
            raise ConfigError(f"data.{key}={getattr(cfg, key)!r} must be one of {', '.join(SPECIAL_CHOICES)}")
    before, after = own_special_tokens(tok)
    bos, eos = _token_id(tok, "bos", cfg.add_bos), _token_id(tok, "eos", cfg.add_eos)
    head = {"auto": before, "true": [bos], "false": []}[cfg.add_bos]
    tail = {"auto": after or ([eos] if eos is not None else []), "true": [eos], "false": []}[cfg.add_eos]
    return head, tail


def own_special_tokens(tok) -> tuple[list[int], list[int]]:
    """What the tokenizer itself puts before and after a text when asked for its special tokens."""
    probe = "a"
    plain = list(tok(probe, add_special_tokens=False)["input_ids"])
    full = list(tok(probe)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    # the text tokenises differently next to special tokens: what it adds to an empty text, EOS last
    empty = list(tok("")["input_ids"])
    eos = getattr(tok, "eos_token_id", None)
    return [t for t in empty if t != eos], [t for t in empty if t == eos]


def _token_id(tok, which: str, setting: str) -> int | None:
    token_id = getattr(tok, f"{which}_token_id", None)
    if token_id is None and setting == "true":
        raise ConfigError(f"data.add_{which}=true, but the tokenizer has no {which.upper()} token "
                          f"(its {which}_token is unset); use data.add_{which}=auto or false")
    return token_id


def sliding_windows(ids: list[int], length: int, stride: int):
    """Windows of `length` tokens starting every `stride`; each token gets its loss in one window only.

    A window's first tokens that an earlier window already predicted are context (-100). Position 0
    of a window is never predicted, so with stride == length the first token of each chunk is lost.
    """
    trained_to = 0  # tokens [.., trained_to) already carry a label in an earlier window
    start = 0
    while True:
        end = min(start + length, len(ids))
        if end <= trained_to:
            return
        window = ids[start:end]
        first_new = max(trained_to - start, 0)
        yield window, [IGNORE_INDEX] * first_new + window[first_new:]
        trained_to = end
        if end == len(ids):
            return
        start += stride
