"""Turn rows of each `data.format` into token ids and labels (-100 where no loss falls).

Runs inside `datasets.map` (batched, maybe in worker processes), so it is a plain function of a
batch: every input row yields one output row per window, each with `dropped` saying why it
cannot be trained ('' when it can). The pipeline counts those reasons, then filters the rows.

A classification row keeps the row layout: its `labels` hold one entry, the class id (collate
pads the rest with -100), and it bears one unit of loss (one example).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fft_dist.config import DataConfig, DataFormat
from fft_dist.errors import ConfigError, DataError

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
OUT_COLUMNS = ("input_ids", "labels", "loss_tokens", "truncated", "windowed", "dropped")


def chat_row_problem(messages) -> str | None:
    """Why a `messages` value cannot be a chat example (None when it can)."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role' and 'content'"
        if m["role"] not in CHAT_ROLES:
            return f"message {i} has unknown role {m['role']!r} (known: {', '.join(CHAT_ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i} content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn (chat loss falls on assistant turns only)"
    return None


TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".txt")


def chat_template_file(value: str) -> Path | None:
    """The one rule for data.chat_template: a value ending in .jinja/.j2/.txt, or holding no '{' (so
    no Jinja), names a template file; any other value is the template itself."""
    return Path(value) if value.lower().endswith(TEMPLATE_FILE_SUFFIXES) or "{" not in value else None


def check_chat_template(cfg: DataConfig, where: str = "data") -> None:
    """Before launch: a data.chat_template that names a file names a readable one."""
    value = cfg.chat_template
    path = chat_template_file(value) if value is not None else None
    if path is None:
        return
    if not path.is_file():
        raise ConfigError(f"{where}.chat_template={value!r} names a template file (it ends in .jinja/.j2/.txt or "
                          f"holds no '{{'), and {path.resolve()} is not a file; fix the path, or give the Jinja "
                          "template itself")
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}.chat_template={value!r}: {path} cannot be read as UTF-8 text ({e})") from None


def resolve_chat_template(cfg: DataConfig, tok) -> str:
    """data.chat_template (the template, or a file: :func:`chat_template_file`), else the tokenizer's own;
    none is an error."""
    value = cfg.chat_template
    if value is not None:
        path = chat_template_file(value)
        if path is None:
            return value
        check_chat_template(cfg)
        return path.read_text(encoding="utf-8")
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ConfigError("data.format=chat needs a chat template, and the tokenizer has none; set "
                          "data.chat_template to a Jinja string or a path to a .jinja file")
    return template


def label_name(value) -> str | None:
    """A row's label as the name it is matched by (JSON 1 and "1" are the same label); None: missing."""
    return None if value is None else str(value)


def label_problem(value, labels) -> str | None:
    """Why a row's label is not one of `labels` (None when it is)."""
    name = label_name(value)
    if name is None:
        return "the label is missing (null)"
    if name not in labels:
        return f"label {name!r} is not in the label set {list(labels)}"
    return None


def resolve_labels(cfg: DataConfig, dataset, index: list[int]) -> list[str]:
    """The label set: data.labels as given, else the distinct labels of the training rows, sorted
    (numerically when they all are numbers). Fewer than two labels is no classification task."""
    if cfg.labels:
        labels = [str(v) for v in cfg.labels]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"data.labels={labels} names a label twice")
        where = f"data.labels={labels}"
    else:
        rows = dataset.select(index) if len(index) != len(dataset) else dataset
        names = {label_name(v) for v in rows.unique(cfg.label_key)} - {None}
        numeric = all(n.lstrip("-").isdigit() for n in names)
        labels = sorted(names, key=(lambda n: (int(n), n)) if numeric else None)
        where = f"the training rows of data.path={cfg.path} (column {cfg.label_key!r})"
    if len(labels) < 2:
        raise DataError(f"{where}: {len(labels)} label(s) {labels}; a classifier needs at least 2 "
                        "(list them all in data.labels)")
    return labels


@dataclass
class Encoder:
    """Batch encoder for `datasets.map(batched=True, with_indices=True)`; `name_row(i)` names row i."""

    cfg: DataConfig
    tok: object
    name_row: Callable[[int], str]
    chat_template: str | None = None
    labels: tuple[str, ...] = ()
    """classification: the label set (class id = position)."""

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        out = {k: [] for k in OUT_COLUMNS}
        fmt = self.cfg.format
        if fmt == DataFormat.text:
            pairs = [([], t) for t in self._tokenize(batch[self.cfg.text_key])]
            self._emit_plain(out, pairs, windows=self.cfg.stride > 0)
        elif fmt == DataFormat.prompt_completion:
            prompts = self._tokenize(batch[self.cfg.prompt_key])
            completions = self._tokenize(batch[self.cfg.completion_key])
            self._emit_plain(out, list(zip(prompts, completions)), windows=False)
        elif fmt == DataFormat.chat:
            for messages, index in zip(batch[self.cfg.messages_key], indices):
                ids, labels = self._chat(messages, index)
                self._emit(out, ids, labels)
        elif fmt == DataFormat.classification:
            # the tokenizer's own special tokens, as `tok(text)` adds them when the exported model is used
            texts = self.tok(list(batch[self.cfg.text_key]))["input_ids"]
            for ids, value, index in zip(texts, batch[self.cfg.label_key], indices):
                self._emit_class(out, ids, value, index)
        else:
            for j, index in enumerate(indices):
                ids, labels = self._tokenized(batch, j, index)
                self._emit(out, ids, labels)
        return out

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def _emit(self, out: dict, ids: list[int], labels: list[int], *, windowed: bool = False) -> None:
        n = self.cfg.max_length
        truncated = len(ids) > n
        ids, labels = list(ids[:n]), list(labels[:n])
        loss = sum(1 for t in labels[1:] if t != IGNORE_INDEX)  # labels[0] is never predicted
        reason = "" if loss else ("no loss tokens left after truncation" if truncated else "no loss tokens")
        for key, value in zip(OUT_COLUMNS, (ids, labels, loss, truncated, windowed, reason)):
            out[key].append(value)

    def _emit_class(self, out: dict, ids: list[int], value, index: int) -> None:
        """The text's tokens (truncated: its head), and the class id; the model pools the last token."""
        problem = label_problem(value, self.labels)
        if problem:
            raise DataError(f"{self.name_row(index)}: column {self.cfg.label_key!r}: {problem}")
        truncated = len(ids) > self.cfg.max_length
        ids = list(ids[: self.cfg.max_length])
        row = (ids, [self.labels.index(label_name(value))], 1 if ids else 0, truncated, False,
               "" if ids else "empty text")
        for key, val in zip(OUT_COLUMNS, row):
            out[key].append(val)

    def _emit_plain(self, out: dict, pairs: list, *, windows: bool) -> None:
        eos = self.tok.eos_token_id
        for prompt, target in pairs:
            ids = list(prompt) + list(target) + ([eos] if eos is not None else [])
            labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
            if windows and len(ids) > self.cfg.max_length:
                for w_ids, w_labels in sliding_windows(ids, self.cfg.max_length, self.cfg.stride):
                    self._emit(out, w_ids, w_labels, windowed=True)
            else:
                self._emit(out, ids, labels)

    def _chat(self, messages, index: int) -> tuple[list[int], list[int]]:
        problem = chat_row_problem(messages)
        if problem:
            raise DataError(f"{self.name_row(index)}: {problem}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        render = self._render
        full = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = render(messages[:i], True), render(messages[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError(f"{self.name_row(index)}: the chat template does not render a conversation's "
                                "beginning as a prefix of the whole, so assistant turns cannot be located; "
                                "use another data.chat_template")
            spans.append((len(before), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                  for t, (start, _) in zip(ids, enc["offset_mapping"])]
        return ids, labels

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template error is the user's to fix: name it
            raise DataError(f"data.chat_template could not render a conversation ({type(e).__name__}: {e})") from None

    def _tokenized(self, batch: dict, j: int, index: int) -> tuple[list[int], list[int]]:
        ids = list(batch["input_ids"][j])
        vocab = len(self.tok)
        if not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise DataError(f"{self.name_row(index)}: input_ids must be a non-empty list of token ids in [0, {vocab})")
        if "labels" in batch and batch["labels"][j] is not None:
            labels = list(batch["labels"][j])
            what = "labels"
        elif "loss_mask" in batch and batch["loss_mask"][j] is not None:
            mask = list(batch["loss_mask"][j])
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
            what = "loss_mask"
            if len(mask) != len(ids):
                labels = []
        else:
            return ids, list(ids)
        if len(labels) != len(ids):
            raise DataError(f"{self.name_row(index)}: {what} has a different length than input_ids ({len(ids)})")
        return ids, labels


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
