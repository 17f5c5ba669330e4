"""Turn rows into token ids and labels (-100 where no loss falls): what every data format shares.

Runs inside `datasets.map` (batched, maybe in worker processes), so it is a plain function of a
batch: every input row yields one output row per window, each with `dropped` saying why it
cannot be trained ('' when it can). The pipeline counts those reasons, then filters the rows.
How a row of one format becomes tokens is that format's `encode` (fft_dist/data/formats/); the
:class:`Encoder` calls it and gives it the emit helpers, so truncation and the drop rule stay one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fft_dist.config import DataConfig
from fft_dist.data.chat_template import chat_template_file  # noqa: F401 - read by fft_dist.model

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
        """(context ids, target ids) pairs: loss on the target and the EOS appended to it; with `windows`
        a sequence longer than data.max_length becomes data.stride windows."""
        eos = self.tok.eos_token_id
        for prompt, target in pairs:
            ids = list(prompt) + list(target) + ([eos] if eos is not None else [])
            labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
            if windows and len(ids) > self.cfg.max_length:
                for w_ids, w_labels in sliding_windows(ids, self.cfg.max_length, self.cfg.stride):
                    self.emit(out, w_ids, w_labels, windowed=True)
            else:
                self.emit(out, ids, labels)


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
