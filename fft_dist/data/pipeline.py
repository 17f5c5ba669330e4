"""Tokenise once per fingerprint into memory-mapped Arrow splits; every rank reads them from there.

The fingerprint covers the source files (path, size, mtime), the tokenizer and every setting
that changes the tokens. Rank 0 builds a missing cache while the others wait; then each node's
first rank builds its own copy if it cannot see rank 0's (a non-shared file system); then all
ranks memory-map the result. A failure on the building rank is raised on every rank alike.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from fft_dist.config import DataConfig
from fft_dist.data.encode import Encoder
from fft_dist.data.examples import DataStats, TokenizedSplit
from fft_dist.data.formats import get_format
from fft_dist.data.packing import pack
from fft_dist.data.sources import Source, check_options, held_out_rows, load_sources, resolve_sources
from fft_dist.dist import all_gather_small, rank_world
from fft_dist.errors import ConfigError, DataError

PIPELINE_VERSION = 2
"""Bump when the encoding changes, so old caches are not reused."""
HELD_OUT_SEED = 0
"""The held-out eval split must not move when train.seed changes."""
KEEP = ["input_ids", "labels", "loss_tokens"]


def _source_stamp(source: Source) -> list:
    files = [source.path] if source.path.is_file() else sorted(p for p in source.path.rglob("*") if p.is_file())
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def tokenizer_identity(tok) -> str:
    """A hash of everything about the tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))).encode())
    h.update(json.dumps([type(tok).__name__, len(tok), tok.eos_token_id, str(tok.all_special_tokens)]).encode())
    return h.hexdigest()


def fingerprint(cfg: DataConfig, tok, chat_template: str | None, *, where: str = "data") -> str:
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("name", "path", "eval_path", "shuffle", "cache_dir", "num_proc", "inspect_terms",
                             "mixture", "group_by_length")}
    settings["format"] = cfg.format
    settings["chat_template"] = chat_template
    parts = {"version": PIPELINE_VERSION, "settings": settings, "tokenizer": tokenizer_identity(tok),
             "train": [_source_stamp(s) for s in resolve_sources(cfg.path, key=f"{where}.path")],
             "eval": [_source_stamp(s) for s in resolve_sources(cfg.eval_path, key=f"{where}.eval_path")]
             if cfg.eval_path is not None else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class RowNamer:
    """Names split row i by its source file and row (picklable, for map's worker processes)."""

    files: list
    starts: list
    index: list

    def __call__(self, i: int) -> str:
        import bisect

        src = self.index[i]
        k = bisect.bisect_right(self.starts, src) - 1
        return f"{self.files[k]}: row {src - self.starts[k] + 1}"


def held_out_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, eval) row indices, each in file order; the same split the JSONL loader always made."""
    order = list(range(n))
    random.Random(HELD_OUT_SEED).shuffle(order)
    held = set(order[: held_out_rows(n, fraction)])
    return [i for i in range(n) if i not in held], sorted(held)


def _template(cfg: DataConfig, tok) -> str | None:
    """The format's rendering template (chat), which the fingerprint covers; None for most formats."""
    fmt = get_format(cfg.format)
    return fmt.template(cfg, tok) if fmt.template is not None else None


def _encode_split(loaded, index: list[int], cfg: DataConfig, tok, template, work: Path, name: str, fp: str,
                  labels: list[str]):
    import datasets

    encoder = Encoder(cfg, tok, RowNamer(loaded.files, loaded.starts, index), template, tuple(labels),
                      get_format(cfg.format))
    encoder.specials  # noqa: B018 - a bad data.add_bos / add_eos is raised here, not inside a map worker
    ds = loaded.dataset.select(index) if len(index) != len(loaded.dataset) else loaded.dataset
    if sys.stderr.isatty():
        datasets.enable_progress_bars()  # the one bar worth seeing: tokenising
    else:  # a log file: one line, not a bar redrawn with carriage returns
        print(f"fft-dist: tokenising {cfg.name} {name} ({len(ds)} rows)", flush=True)  # with the other banner lines
    try:
        return _map(ds, encoder, cfg, work, name, fp)
    finally:
        datasets.disable_progress_bars()


def _map(ds, encoder, cfg: DataConfig, work: Path, name: str, fp: str):
    return ds.map(encoder, batched=True, with_indices=True, remove_columns=ds.column_names,
                  num_proc=_num_proc(cfg, len(ds)),
                  new_fingerprint=f"{fp}-{name}", cache_file_name=str(work / f"{name}-map.arrow"),
                  desc=f"fft-dist: tokenising {cfg.name} {name}")


def _num_proc(cfg: DataConfig, rows: int) -> int | None:
    return cfg.num_proc if cfg.num_proc > 1 and rows > cfg.num_proc else None


def _stats(encoded, rows: int, max_length: int) -> DataStats:
    import numpy as np
    import pyarrow.compute as pc

    table = encoded.data
    dropped = table.column("dropped").to_pylist()
    reasons: dict[str, int] = {}
    for r in dropped:
        if r:
            reasons[r] = reasons.get(r, 0) + 1
    keep = np.array([not r for r in dropped], dtype=bool)
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)[keep]
    edges = sorted({0, *[2 ** k for k in range(4, 32) if 2 ** k < max_length], max_length + 1})
    counts, _ = np.histogram(lengths, bins=edges)
    windowed = table.column("windowed").to_numpy(zero_copy_only=False)
    return DataStats(
        rows=rows, examples=int(keep.sum()),
        truncated=int(table.column("truncated").to_numpy(zero_copy_only=False).sum()),
        windowed=int(windowed.sum()), dropped_no_loss=sum(reasons.values()), dropped=reasons,
        loss_tokens=int(table.column("loss_tokens").to_numpy()[keep].sum()), tokens=int(lengths.sum()),
        lengths=[int(c) for c in counts], length_edges=[int(e) for e in edges])


def build_cache(cfg: DataConfig, tok, target: Path, fp: str, *, where: str = "data", eval_only: bool = False) -> None:
    """Read, split, tokenise and save both splits under `target` (atomically: a rename at the end)."""
    import datasets

    datasets.disable_progress_bars()
    template = _template(cfg, tok)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-", dir=target.parent))
    try:
        work = tmp / "work"
        loaded = load_sources(cfg.path, cfg, key=f"{where}.path", work_dir=work)
        if cfg.eval_path is not None:
            eval_loaded = load_sources(cfg.eval_path, cfg, key=f"{where}.eval_path", work_dir=work)
            train_idx, eval_idx = list(range(len(loaded.dataset))), list(range(len(eval_loaded.dataset)))
        else:
            eval_loaded = loaded
            train_idx, eval_idx = held_out_split(len(loaded.dataset), cfg.eval_fraction)
        if cfg.max_examples:
            train_idx = train_idx[: cfg.max_examples]
        label_set = get_format(cfg.format).label_set
        labels = label_set(cfg, loaded.dataset, train_idx) if label_set is not None else []
        stats = {}
        for name, src, index in (("train", loaded, train_idx), ("eval", eval_loaded, eval_idx)):
            if not index:
                stats[name] = asdict(DataStats())
                encoded = None
            else:
                encoded = _encode_split(src, index, cfg, tok, template, work, name, fp, labels)
                stats[name] = asdict(_stats(encoded, len(index), cfg.max_length))
                encoded = encoded.filter(lambda d: [not r for r in d], input_columns="dropped", batched=True,
                                         cache_file_name=str(work / f"{name}-filter.arrow")).select_columns(KEEP)
                if name == "train" and cfg.packing and stats[name]["examples"]:
                    encoded = pack(encoded, max_length=cfg.max_length, cache_file_name=str(work / "packed.arrow"),
                                   num_proc=_num_proc(cfg, len(encoded)))
                    stats[name]["packed_rows"] = len(encoded)
            stats[name]["labels"] = labels
            if not (eval_only and name == "train"):  # a held-out set's train side is never used
                _check_nonempty(name, stats[name], cfg, where)
            if encoded is not None:
                encoded.save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        shutil.rmtree(work, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another node's builder won the race on a shared file system
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_nonempty(name: str, stats: dict, cfg: DataConfig, where: str) -> None:
    if stats["examples"]:
        return
    if name == "train":
        if not stats["rows"]:
            raise DataError(f"{where}.path={cfg.path}: no training rows (max_examples / eval_fraction left none)")
        raise DataError(f"{where}.path={cfg.path}: no usable training rows (all {stats['rows']} had an empty "
                        f"loss mask: {stats['dropped']}); raise data.max_length or check the data")
    if cfg.eval_path is not None:
        raise DataError(f"{where}.eval_path={cfg.eval_path}: empty after filtering (all {stats['rows']} rows "
                        f"had an empty loss mask: {stats['dropped']})")


def _complete(target: Path) -> bool:
    return (target / "stats.json").is_file()


_TEMP_ROOT: list[Path] = []


def _temp_cache_root() -> Path:
    """Without a cache dir (a script, a test): one temporary folder for this process, removed at exit."""
    if not _TEMP_ROOT:
        _TEMP_ROOT.append(Path(tempfile.mkdtemp(prefix="fft-dist-data-")))
        atexit.register(shutil.rmtree, _TEMP_ROOT[0], True)
    return _TEMP_ROOT[0]


BUILD_WAIT_S = 6 * 3600
"""How long the other ranks wait for the building rank (tokenising a large set outlasts dist.timeout_s)."""


def _wait_group():
    """A gloo group with a long timeout for the wait on the builder (None with one process)."""
    if rank_world()[1] == 1:
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=BUILD_WAIT_S))


def _agree(problem: tuple[str, str] | None, group=None) -> None:
    """Raise the first rank's problem on every rank (collective when there are several ranks)."""
    problems = all_gather_small(problem, group=group)
    first = next((p for p in problems if p), None)
    if first:
        raise (ConfigError if first[0] == "ConfigError" else DataError)(first[1])


def _step(should_build: bool, cfg: DataConfig, tok, target: Path, fp: str, group, where: str,
          eval_only: bool = False) -> bool:
    built, problem = False, None
    if should_build and not _complete(target):
        try:
            build_cache(cfg, tok, target, fp, where=where, eval_only=eval_only)
            built = True
        except (DataError, ConfigError) as e:
            problem = (type(e).__name__, str(e))
    _agree(problem, group)
    return built


def load_datasets(cfg: DataConfig, tok, *, cache_dir: str | Path | None = None, where: str = "data",
                  eval_only: bool = False) -> tuple[TokenizedSplit, TokenizedSplit, DataStats]:
    """Train and eval splits (memory-mapped), and the training split's stats. Collective under torch.distributed.

    `cache_dir` (else data.cache_dir, else a temporary folder) holds one folder per fingerprint.
    `where` is the config key errors name (data, or data.mixture.<name> for a mixture's source).
    `eval_only`: only the eval split is used (an eval.sets entry), so an empty train split is no error.
    """
    import datasets

    check_options(cfg)
    template = _template(cfg, tok)
    root = Path(cache_dir or cfg.cache_dir or _temp_cache_root())
    fp = fingerprint(cfg, tok, template, where=where)
    target = root / fp
    rank, world = rank_world()
    existed = _complete(target)
    group = _wait_group()
    _step(rank == 0, cfg, tok, target, fp, group, where, eval_only)
    if world > 1:  # a node that cannot see rank 0's cache builds its own copy
        _step(int(os.environ.get("LOCAL_RANK", rank)) == 0, cfg, tok, target, fp, group, where, eval_only)
        import torch.distributed as dist

        dist.destroy_process_group(group)
    problem = None
    try:
        stats = json.loads((target / "stats.json").read_text())
        splits = [TokenizedSplit(datasets.load_from_disk(str(target / n))) if (target / n).is_dir()
                  else TokenizedSplit([]) for n in ("train", "eval")]
    except (OSError, ValueError) as e:
        problem = ("DataError", f"{target}: the tokenised data cache could not be read ({e}); delete it to rebuild")
    _agree(problem)
    train_stats = DataStats(**stats["train"])
    train_stats.cache, train_stats.reused = str(target), existed
    return splits[0], splits[1], train_stats
