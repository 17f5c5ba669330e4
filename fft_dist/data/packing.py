"""Packing: several examples in one row of at most `max_length` tokens, with position ids that
restart per example. The model is then called without an attention mask, and transformers
builds a block-causal mask from those position ids, so no example attends to another.

Rows are filled greedily in data order (next fit), within batches of the map; the shuffle then
moves whole packed rows, so the sampler stays a pure function of (seed, step).
"""
from __future__ import annotations

from fft_dist.data.encode import IGNORE_INDEX

PACK_COLUMNS = ("input_ids", "labels", "position_ids", "loss_tokens")


def pack_batch(batch: dict, *, max_length: int) -> dict:
    """Packed rows for a batch of examples (`datasets.map(batched=True)`)."""
    out = {k: [] for k in PACK_COLUMNS}
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    loss = 0

    def flush():
        if ids:
            for key, value in zip(PACK_COLUMNS, (list(ids), list(labels), list(positions), loss)):
                out[key].append(value)

    for ex_ids, ex_labels, ex_loss in zip(batch["input_ids"], batch["labels"], batch["loss_tokens"]):
        if len(ids) + len(ex_ids) > max_length:
            flush()
            ids, labels, positions, loss = [], [], [], 0
        ids += ex_ids
        # an example's first token is never predicted, least of all from the previous example
        labels += [IGNORE_INDEX] + list(ex_labels[1:])
        positions += range(len(ex_ids))
        loss += ex_loss
    flush()
    return out


def pack(dataset, *, max_length: int, cache_file_name: str, num_proc: int | None):
    return dataset.map(pack_batch, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                       fn_kwargs={"max_length": max_length}, cache_file_name=cache_file_name, num_proc=num_proc,
                       desc="fft-dist: packing train")
