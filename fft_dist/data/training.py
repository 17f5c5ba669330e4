"""What the training loop gets from the data layer: one train split, the named eval sets, the sampler.

Without `data.mixture` this is `load_datasets` and :class:`GlobalBatchSampler`, as before. With a
mixture, each source is loaded through the same cache (one fingerprint per source), the train
splits are read as one (:class:`MixedSplit`) and :class:`MixtureSampler` draws from them by weight.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

from fft_dist.config import DataConfig
from fft_dist.data.examples import DataStats, Example, TokenizedSplit
from fft_dist.data.mixture import MixSource, mixture_sources
from fft_dist.data.pipeline import load_datasets
from fft_dist.data.sampler import GlobalBatchSampler, MixtureSampler


class MixedSplit:
    """Several train splits read as one: row ids are numbered source after source."""

    def __init__(self, parts: list[TokenizedSplit]):
        self.parts = parts
        self.offsets = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
        self.size = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return len(self) > 0

    def source_of(self, row: int) -> int:
        return bisect.bisect_right(self.offsets, row) - 1

    def rows(self, indices) -> list[Example]:
        """The examples at `indices`, in that order (one Arrow read per source)."""
        indices = [int(i) for i in indices]
        by_source: dict[int, list[int]] = {}
        for i in indices:
            by_source.setdefault(self.source_of(i), []).append(i)
        found: dict[int, Example] = {}
        for s, rows in by_source.items():
            found.update(zip(rows, self.parts[s].rows([r - self.offsets[s] for r in rows])))
        return [found[i] for i in indices]

    def __getitem__(self, key: int) -> Example:
        return self.rows([key])[0]


@dataclass
class EvalSet:
    """One eval split. `name` None: the run has one source and reports only eval_loss."""

    name: str | None
    share: float
    split: TokenizedSplit


@dataclass
class TrainingData:
    train: TokenizedSplit | MixedSplit
    evals: list[EvalSet]
    stats: DataStats
    """The training stats, summed over the sources of a mixture."""
    sources: list[MixSource] = field(default_factory=list)
    """The mixture's sources (empty without data.mixture)."""
    source_stats: list[DataStats] = field(default_factory=list)
    group_by_length: int = 0
    """data.group_by_length (single source, unpacked)."""

    def sampler(self, global_batch_size: int, *, seed: int, shuffle: bool = True):
        if not self.sources:
            lengths = self.train.lengths() if self.group_by_length else None
            return GlobalBatchSampler(len(self.train), global_batch_size, seed=seed, shuffle=shuffle,
                                      lengths=lengths, group_by_length=self.group_by_length)
        return MixtureSampler([len(p) for p in self.train.parts], [s.share for s in self.sources],
                              global_batch_size, seed=seed, shuffle=shuffle, names=[s.name for s in self.sources])


def load_training_data(cfg: DataConfig, tok, *, cache_dir: str | Path | None = None) -> TrainingData:
    """Train split, eval sets and stats for `cfg` (collective under torch.distributed, like load_datasets)."""
    if not cfg.mixture:
        train, evals, stats = load_datasets(cfg, tok, cache_dir=cache_dir)
        return TrainingData(train, [EvalSet(None, 1.0, evals)] if evals else [], stats,
                            group_by_length=cfg.group_by_length)
    sources = mixture_sources(cfg)
    parts, evals, all_stats = [], [], []
    for source in sources:
        train, ev, stats = load_datasets(source.cfg, tok, cache_dir=cache_dir, where=source.where)
        parts.append(train)
        all_stats.append(stats)
        if ev:
            evals.append(EvalSet(source.name, source.share, ev))
    return TrainingData(MixedSplit(parts), evals, summed(all_stats), sources, all_stats)


def summed(stats: list[DataStats]) -> DataStats:
    """One DataStats for the banner: counts added up; the cache is the sources' common folder."""
    total = DataStats()
    for s in stats:
        for key in ("rows", "examples", "truncated", "windowed", "dropped_no_loss", "loss_tokens", "tokens",
                    "packed_rows"):
            setattr(total, key, getattr(total, key) + getattr(s, key))
        for reason, n in s.dropped.items():
            total.dropped[reason] = total.dropped.get(reason, 0) + n
    total.reused = all(s.reused for s in stats)
    total.cache = f"{len(stats)} folders under {Path(stats[0].cache).parent}" if stats else ""
    return total
