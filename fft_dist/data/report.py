"""`fft-dist data`: what the configured data turns into, before any training.

It runs the same pipeline a training run does (so the cache it builds is the one training uses
when data.cache_dir points there) and prints the splits, token lengths, what was truncated,
windowed or dropped and why, the loss-bearing share, the first example with its loss mask, and
how domain terms (data.inspect_terms) split into tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from fft_dist.config import DataConfig, DataFormat
from fft_dist.data.encode import IGNORE_INDEX, special_tokens
from fft_dist.data.formats import get_format
from fft_dist.data.examples import DataStats, Example
from fft_dist.data.pipeline import load_datasets

MANY_PIECES = 4
"""A term that splits into more tokens than this gets a warning."""
LOSS_OPEN, LOSS_CLOSE = "[[", "]]"
BAR = 40


BOOKKEEPING = {"id", "idx", "index", "uuid", "source", "url", "dataset", "meta", "metadata", "license", "lang",
               "language", "category", "split", "hash", "timestamp", "created_at", "length", "num_tokens", "score"}
"""Column names that label a row rather than hold what it teaches: not reported as unread."""
HINTS = {"input": "an Alpaca `input`: data.format=chat reads instruction/input/output as one conversation",
         "system": "a system prompt: data.format=chat reads it with Alpaca or messages rows",
         "tools": "function schemas: data.format=chat passes them to the template",
         "conversations": "ShareGPT turns: data.format=chat reads them",
         "messages": "chat turns: data.format=chat reads them"}


def unread_lines(cfg: DataConfig) -> list[str]:
    """Columns of the sources that the format does not read (bookkeeping names aside): what never reaches
    the model should be said, not dropped in silence."""
    from fft_dist.data.formats import get_format
    from fft_dist.data.sources import columns_of, expected_columns, resolve_sources

    found: dict[str, None] = {}
    for source in resolve_sources(cfg.path, key="data.path"):
        found.update(dict.fromkeys(columns_of(source)))
    read = {*expected_columns(cfg, list(found)), *get_format(cfg.format).optional_columns}
    unread = [c for c in found if c not in read and c.lower() not in BOOKKEEPING]
    if not unread:
        return []
    return [f"not read by data.format={cfg.format}: column(s) {', '.join(unread)} (they never reach the model)"] + [
        f"  {c}: {HINTS[c]}" for c in unread if c in HINTS]


def histogram_lines(stats: DataStats) -> list[str]:
    edges, counts = stats.length_edges, stats.lengths
    top = max(counts, default=0) or 1
    out = []
    for lo, hi, n in zip(edges, edges[1:], counts):
        out.append(f"  {lo:>6}-{hi - 1:<6} {'#' * round(BAR * n / top):<{BAR}} {n}")
    return out


def render_with_mask(example: Example, tok) -> str:
    """The example's text with the loss-bearing spans inside [[ ]] (position 0 is never predicted)."""
    pieces, run, trained = [], [], False
    for pos, (t, label) in enumerate(zip(example.input_ids, example.labels)):
        is_loss = pos > 0 and label != IGNORE_INDEX
        if run and is_loss != trained:
            pieces.append(_piece(tok, run, trained))
            run = []
        run.append(t)
        trained = is_loss
    if run:
        pieces.append(_piece(tok, run, trained))
    return "".join(pieces)


def _piece(tok, ids: list[int], trained: bool) -> str:
    text = tok.decode(ids)
    return f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if trained else text


def special_line(cfg: DataConfig, tok) -> str:
    """Which special tokens frame each example, and which setting chose them."""
    before, after = special_tokens(tok, cfg)

    def shown(ids: list[int]) -> str:
        return " ".join(tok.convert_ids_to_tokens(ids)) if ids else "nothing"

    windows = "; every stride window too" if before and cfg.stride else ""
    return (f"special tokens: {shown(before)} before each example (data.add_bos={cfg.add_bos}{windows}), "
            f"{shown(after)} after it (data.add_eos={cfg.add_eos})")


def term_lines(terms: list[str], tok) -> tuple[list[str], list[str]]:
    """(one line per term, warnings for terms that split into many pieces)."""
    lines, warnings = [], []
    for term in terms:
        for shown in (term, " " + term):  # mid-sentence words usually carry the leading space
            pieces = tok.convert_ids_to_tokens(tok(shown, add_special_tokens=False)["input_ids"])
            lines.append(f"  {shown!r:<30} {len(pieces):>3} piece(s): {pieces}")
            if len(pieces) > MANY_PIECES and shown == term:
                warnings.append(f"warning: {term!r} splits into {len(pieces)} pieces (> {MANY_PIECES}); the model "
                                "sees it as fragments, so it may need more examples to learn it")
    return lines, warnings


def class_lines(train, stats: DataStats, tok) -> list[str]:
    """classification: the label set with its training counts, and the first example with its label."""
    import pyarrow.compute as pc

    ids = pc.list_element(train.dataset.data.column("labels"), 0)
    counts = {v["values"].as_py(): v["counts"].as_py() for v in pc.value_counts(ids)}
    first = train[0]
    return ["labels (class id = position; loss: one cross-entropy per example): "
            + ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(stats.labels)),
            f"first training example ({len(first.input_ids)} tokens; label {stats.labels[first.labels[0]]!r}):",
            tok.decode(first.input_ids)]


def data_report(cfg: DataConfig, tok, *, cache_dir: str | Path | None = None) -> str:
    """The report as text (the same pipeline and cache as training); a mixture gets one section per source."""
    if not cfg.mixture:
        return _source_report(cfg, tok, cache_dir=cache_dir)
    from fft_dist.data.mixture import mixture_sources

    sources = mixture_sources(cfg)
    lines = [f"data: {cfg.name}, a mixture of {len(sources)} sources: "
             + ", ".join(f"{s.name} {s.share:.1%}" for s in sources) + " of every batch"]
    for s in sources:
        lines += ["", f"== source {s.name} ({s.where}, weight share {s.share:.1%}) ==",
                  _source_report(s.cfg, tok, cache_dir=cache_dir, where=s.where, terms=False)]
    if cfg.inspect_terms:
        term, warnings = term_lines(list(cfg.inspect_terms), tok)
        lines += ["", "term splits (data.inspect_terms):", *term, *warnings]
    return "\n".join(lines)


def _source_report(cfg: DataConfig, tok, *, cache_dir, where: str = "data", terms: bool = True) -> str:
    train, evals, stats = load_datasets(cfg, tok, cache_dir=cache_dir, where=where)
    eval_stats = DataStats(**json.loads((Path(stats.cache) / "stats.json").read_text())["eval"])
    share = stats.loss_tokens / stats.tokens if stats.tokens else 0.0
    lines = [
        f"data: {cfg.name} (format {cfg.format}, max_length {cfg.max_length}) from {cfg.path}",
        *unread_lines(cfg),
        f"cache: {stats.cache} ({'reused' if stats.reused else 'built now'})",
        f"train: {len(train)} examples from {stats.rows} rows",
        f"eval:  {len(evals)} examples from {eval_stats.rows} rows "
        f"({'data.eval_path' if cfg.eval_path is not None else f'held out: data.eval_fraction={cfg.eval_fraction}'})",
        "token lengths (train examples):",
        *histogram_lines(stats),
        f"truncated to data.max_length={cfg.max_length}: {stats.truncated} train, {eval_stats.truncated} eval",
        f"windowed (data.stride={cfg.stride}): {stats.windowed} train windows",
        f"dropped: {stats.dropped_no_loss} train, {eval_stats.dropped_no_loss} eval" + "".join(
            f"\n  {reason}: {n} train" for reason, n in sorted(stats.dropped.items())),
        f"loss-bearing tokens: {stats.loss_tokens} of {stats.tokens} ({share:.1%})",
    ]
    if "add_bos" in get_format(cfg.format).options:
        lines.append(special_line(cfg, tok))
    if cfg.packing:
        slots = stats.packed_rows * cfg.max_length
        lines.append(f"packing: {stats.examples} examples in {stats.packed_rows} rows; {stats.tokens} real tokens "
                     f"in {slots} slots ({stats.tokens / slots if slots else 0.0:.1%} efficiency)")
    if cfg.format == DataFormat.classification:
        lines[-1:] = class_lines(train, stats, tok)
    elif len(train) and not cfg.packing:
        lines += [f"first training example ({len(train[0].input_ids)} tokens; loss on {LOSS_OPEN}...{LOSS_CLOSE}):",
                  render_with_mask(train[0], tok)]
    elif len(train):
        first = train[0]
        end = first.position_ids.index(0, 1) if 0 in first.position_ids[1:] else len(first.input_ids)
        lines += [f"first packed example ({end} tokens; loss on {LOSS_OPEN}...{LOSS_CLOSE}):",
                  render_with_mask(type(first)(first.input_ids[:end], first.labels[:end]), tok)]
    if terms and cfg.inspect_terms:
        term, warnings = term_lines(list(cfg.inspect_terms), tok)
        lines += ["term splits (data.inspect_terms):", *term, *warnings]
    return "\n".join(lines)
