"""Read JSONL rows and turn them into token ids plus labels (-100 where no loss falls).

Errors name the file and line, and nothing is trained on rows we could not read.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fft_dist.config import DataConfig, DataFormat

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad or unusable data; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        # labels[0] is never predicted (there is no token before it).
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    notes: list[str] = field(default_factory=list)


def read_jsonl(path: str | Path, required: list[str]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(
                    f"{path}:{lineno}: missing column(s) {missing}; expected {required}, found {sorted(row)}"
                )
            bad = [k for k in required if not isinstance(row[k], str)]
            if bad:
                raise DataError(f"{path}:{lineno}: column(s) {bad} must be strings")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: the data set is empty (no rows)")
    return rows


def required_columns(cfg: DataConfig) -> list[str]:
    if cfg.format == DataFormat.text:
        return [cfg.text_key]
    return [cfg.prompt_key, cfg.completion_key]


def encode_rows(rows: list[dict], cfg: DataConfig, tok: PreTrainedTokenizerBase, stats: DataStats) -> list[Example]:
    eos = tok.eos_token_id
    out: list[Example] = []
    if not rows:
        return out
    if cfg.format == DataFormat.text:
        texts = tok([r[cfg.text_key] for r in rows], add_special_tokens=False)["input_ids"]
        pairs = [([], t) for t in texts]
    else:
        prompts = tok([r[cfg.prompt_key] for r in rows], add_special_tokens=False)["input_ids"]
        completions = tok([r[cfg.completion_key] for r in rows], add_special_tokens=False)["input_ids"]
        pairs = list(zip(prompts, completions))
    for prompt, target in pairs:
        stats.rows += 1
        ids = list(prompt) + list(target) + ([eos] if eos is not None else [])
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        if len(ids) > cfg.max_length:
            stats.truncated += 1
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        example = Example(ids, labels)
        if example.loss_tokens == 0:
            stats.dropped_no_loss += 1  # never train a zero-loss row silently
            continue
        out.append(example)
    return out


def load_datasets(cfg: DataConfig, tok: PreTrainedTokenizerBase) -> tuple[list[Example], list[Example], DataStats]:
    """Train and eval examples. Eval comes from data.eval_path or a fixed-seed held-out fraction."""
    cols = required_columns(cfg)
    rows = read_jsonl(cfg.path, cols)
    if cfg.eval_path:
        eval_rows = read_jsonl(cfg.eval_path, cols)
        train_rows = rows
    else:
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)  # the split must not move when train.seed changes
        n_eval = int(round(len(rows) * cfg.eval_fraction))
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        train_rows = [r for i, r in enumerate(rows) if i not in held]
    if cfg.max_examples:
        train_rows = train_rows[: cfg.max_examples]
    stats = DataStats()
    train = encode_rows(train_rows, cfg, tok, stats)
    evals = encode_rows(eval_rows, cfg, tok, DataStats())
    if not train:
        raise DataError(f"{cfg.path}: no usable training rows (all {stats.rows} had an empty loss mask)")
    return train, evals, stats
