"""One tokenised example as the loop sees it, and a split of them read row by row from Arrow.

The tokenised splits live in memory-mapped Arrow files; an :class:`Example` is built only for
the rows of the batch at hand, so a rank's memory does not grow with the data set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fft_dist.data.encode import IGNORE_INDEX
from fft_dist.errors import DataError  # noqa: F401 - re-exported with the data API

__all__ = ["IGNORE_INDEX", "DataError", "DataStats", "Example", "TokenizedSplit"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Packed rows only: positions restarting at 0 for each packed example."""

    @property
    def loss_tokens(self) -> int:
        # labels[0] is never predicted (there is no token before it).
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class DataStats:
    """What happened to the training rows on the way to examples (from the cache's stats.json)."""

    rows: int = 0
    """Source rows read for the split."""
    examples: int = 0
    """Rows (or windows) kept for training."""
    truncated: int = 0
    windowed: int = 0
    """Examples that are windows of a longer document (data.stride)."""
    dropped_no_loss: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Dropped examples by reason."""
    loss_tokens: int = 0
    tokens: int = 0
    packed_rows: int = 0
    """data.packing: the rows the examples were packed into (efficiency = tokens / (rows x max_length))."""
    lengths: list[int] = field(default_factory=list)
    """Histogram counts of example lengths over `length_edges`."""
    length_edges: list[int] = field(default_factory=list)
    cache: str = ""
    """The folder the tokenised splits were read from."""
    reused: bool = False
    """True when that folder existed before this call (nothing was tokenised)."""
    labels: list[str] = field(default_factory=list)
    """data.format=classification: the label set (class id = position), the same for both splits."""


class TokenizedSplit:
    """A sequence of :class:`Example` over an Arrow dataset (input_ids, labels, loss_tokens)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __bool__(self) -> bool:
        return len(self.dataset) > 0

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.rows(range(len(self))[key])
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError(key)
        return self.rows([key])[0]

    def rows(self, indices) -> list[Example]:
        """The examples at `indices`, in that order (one Arrow read)."""
        indices = [int(i) for i in indices]
        if not indices:
            return []
        batch = self.dataset[indices]
        positions = batch.get("position_ids") or [None] * len(indices)
        return [Example(i, l, p) for i, l, p in zip(batch["input_ids"], batch["labels"], positions)]

    def lengths(self):
        """Every row's token count (numpy int64), read from the Arrow offsets without the tokens."""
        import pyarrow.compute as pc

        column = self.dataset.with_format("arrow")["input_ids"]
        return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype("int64")

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self.rows(range(start, min(start + 1024, len(self))))
