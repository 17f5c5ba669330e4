"""data.format=classification: `text_key` -> `label_key`, one cross-entropy per example on a task head.

A row keeps the row layout: its `labels` hold one entry, the class id (collate pads the rest with
-100), and it bears one unit of loss (one example).
"""
from __future__ import annotations

from fft_dist.config import DataConfig
from fft_dist.data.formats.registry import Format, register_format
from fft_dist.errors import ConfigError, DataError


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


def encode(enc, batch: dict, indices: list[int], out: dict) -> None:
    # the tokenizer's own special tokens, as `tok(text)` adds them when the exported model is used
    texts = enc.tok(list(batch[enc.cfg.text_key]))["input_ids"]
    for ids, value, index in zip(texts, batch[enc.cfg.label_key], indices):
        _emit(enc, out, ids, value, index)


def _emit(enc, out: dict, ids: list[int], value, index: int) -> None:
    """The text's tokens (truncated: its head), and the class id; the model pools the last token."""
    problem = label_problem(value, enc.labels)
    if problem:
        raise DataError(f"{enc.name_row(index)}: column {enc.cfg.label_key!r}: {problem}")
    truncated = len(ids) > enc.cfg.max_length
    ids = list(ids[: enc.cfg.max_length])
    enc.append(out, (ids, [enc.labels.index(label_name(value))], 1 if ids else 0, truncated, False,
                     "" if ids else "empty text"))


def _row_problem(row: dict, cfg: DataConfig) -> str | None:
    if not cfg.labels:
        return None
    problem = label_problem(row[cfg.label_key], [str(v) for v in cfg.labels])
    return f"column {cfg.label_key!r}: {problem}" if problem else None


CLASSIFICATION = register_format(Format(
    "classification", encode, columns={"text_key": str, "label_key": object},  # a label is a name or a number
    options=("labels",), objective="examples", row_problem=_row_problem, label_set=resolve_labels,
    packing="the classifier reads one pooled token per row (the last non-pad one), so a packed row would give "
            "one prediction for several examples"))
