"""data.format=tokenized: `input_ids` used as given, with optional `labels` (-100: no loss) or `loss_mask`."""
from __future__ import annotations

from fft_dist.data.encode import IGNORE_INDEX
from fft_dist.data.formats.registry import Format, register_format
from fft_dist.errors import DataError


def encode(enc, batch: dict, indices: list[int], out: dict) -> None:
    for j, index in enumerate(indices):
        ids, labels = _row(enc, batch, j, index)
        enc.emit(out, ids, labels)


def _row(enc, batch: dict, j: int, index: int) -> tuple[list[int], list[int]]:
    ids = list(batch["input_ids"][j])
    vocab = len(enc.tok)
    if not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
        raise DataError(f"{enc.name_row(index)}: input_ids must be a non-empty list of token ids in [0, {vocab})")
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
        raise DataError(f"{enc.name_row(index)}: {what} has a different length than input_ids ({len(ids)})")
    return ids, labels


TOKENIZED = register_format(Format("tokenized", encode, fixed_columns={"input_ids": list},
                                   optional_columns=("labels", "loss_mask")))
