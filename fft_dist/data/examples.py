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
from fft_dist.errors import DataError  # noqa: F401 - re-exported with the data API

IGNORE_INDEX = -100




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


def _describe(path: Path) -> str:
    return "a directory" if path.is_dir() else "missing"


def iter_jsonl(path: str | Path, required: list[str], *, max_lines: int | None = None):
    """Yield (line number, row) of a JSONL file, checking each row; errors name the file and line.

    Lines are decoded one by one, so a stray non-UTF-8 byte or a binary file (parquet, arrow) is
    reported where it is instead of as a decoder traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file is {_describe(path)}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if max_lines is not None and lineno > max_lines:
                return
            if b"\0" in raw or (lineno == 1 and raw.startswith((b"PAR1", b"ARROW1"))):
                raise DataError(f"{path}:{lineno}: a binary file (parquet/arrow?), not JSONL text")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
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
            yield lineno, row


def read_jsonl(path: str | Path, required: list[str]) -> list[dict]:
    rows = [row for _, row in iter_jsonl(path, required)]
    if not rows:
        raise DataError(f"{path}: the data set is empty (no rows)")
    return rows


PRECHECK_LINES = 100_000
"""Lines of each data file the launcher checks before starting ranks (all of a typical fine-tuning set)."""


def check_data_files(cfg: DataConfig) -> None:
    """Before launch: the files exist, decode, parse and have the columns (cheap: no tokenizer)."""
    cols = required_columns(cfg)
    for path in (cfg.path, cfg.eval_path):
        if path is None:
            continue
        rows = sum(1 for _ in iter_jsonl(path, cols, max_lines=PRECHECK_LINES))
        if not rows:
            raise DataError(f"{path}: the data set is empty (no rows)")


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
