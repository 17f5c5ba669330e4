"""Reading a data file's rows and column types without loading it with `datasets`: JSON lines and arrays,
text and CSV lines, the schema of columnar files. Errors name the file and the line, so a stray byte or a
bad row is reported where it is, before any rank starts.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fft_dist.config import DataConfig
from fft_dist.data.formats import get_format
from fft_dist.errors import DataError

PRECHECK_LINES = 100_000
"""Lines of each JSONL file the launcher checks before starting ranks (all of a typical fine-tuning set)."""


def text_rows(path: Path, sample_by: str) -> int:
    """Rows a .txt file gives under data.sample_by (within its first PRECHECK_LINES lines), as `datasets`
    cuts it: every line; every block between blank lines; the whole file."""
    if sample_by == "document":
        return 1 if any(line.strip() for _, line in read_lines(path, PRECHECK_LINES, "text")) else 0
    if sample_by == "line":
        return sum(1 for _ in read_lines(path, PRECHECK_LINES, "text"))
    paragraphs, blank = 0, True
    for _, line in read_lines(path, PRECHECK_LINES, "text"):
        paragraphs += int(blank and bool(line.strip()))
        blank = not line.strip()
    return paragraphs


KIND_NAMES = {str: "a string", list: "a list", type(None): "null"}


def kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(KIND_NAMES.get(k, k.__name__) for k in kinds)


def optional_kind(kind) -> bool:
    """A column a row or file may lack (its kinds include None: chat's `tools`)."""
    return isinstance(kind, tuple) and type(None) in kind


def arrow_holds(arrow_type: Any, kind) -> bool:
    """Whether a column of `arrow_type` gives Python values of `kind` (what a JSON row is checked for)."""
    import pyarrow as pa

    if isinstance(kind, tuple):
        return any(arrow_holds(arrow_type, k) for k in kind if k is not type(None))

    if kind is str:
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)
    if kind is list:
        return any(check(arrow_type) for check in (pa.types.is_list, pa.types.is_large_list,
                                                    pa.types.is_fixed_size_list, pa.types.is_list_view))
    return True


def csv_header(path: Path) -> list[str]:
    """A CSV file's column names. CSV holds text: every column is read as strings (no type guessing)."""
    first = next(read_lines(path, 1, "CSV"), (1, ""))[1]
    return next(csv.reader(io.StringIO(first)), [])


def columnar_schema(path: Path, loader: str):
    """(arrow schema, rows) from a file's header or metadata, without reading its data."""
    import pyarrow as pa

    try:
        if loader == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path)
            return meta.schema_arrow, meta.metadata.num_rows
        if loader == "csv":
            rows = sum(1 for _ in read_lines(path, None, "CSV")) - 1
            return pa.schema([(name, pa.string()) for name in csv_header(path)]), max(rows, 0)
        if loader == "arrow":
            with pa.memory_map(str(path)) as mm:
                try:
                    reader = pa.ipc.open_stream(mm)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(mm)
                return reader.schema, 1  # the row count needs a full read
        import datasets

        ds = datasets.load_from_disk(str(path))
        return ds.features.arrow_schema, len(ds)
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable {loader} source ({type(e).__name__}: {e})") from None


def iter_json_rows(path: str | Path, want: dict[str, type], cfg: DataConfig | None = None, *,
                   max_lines: int | None = None):
    """Yield (line number, row) of a JSON-lines file, checking each row; errors name the file and line.

    Lines are decoded one by one, so a stray non-UTF-8 byte or a binary file (parquet, arrow) is
    reported where it is instead of as a decoder traceback. A .json file holding one array is
    checked as a whole (its rows are numbered from 1).
    """
    fmt = get_format(cfg.format) if cfg is not None else None
    row_problem = fmt.row_problem if fmt is not None else None
    layout = fmt is not None and fmt.source_columns is not None  # read from the file's first row
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file is {'a directory' if path.is_dir() else 'missing'}")
    for lineno, row in json_rows(path, max_lines):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        if layout:
            want, layout = fmt.columns_in(cfg, row), False
        missing = [k for k, t in want.items() if k not in row and not optional_kind(t)]
        if missing:
            raise DataError(f"{path}:{lineno}: missing column(s) {missing}; expected {list(want)}, found {sorted(row)}")
        bad = [k for k, t in want.items() if not isinstance(row.get(k), t)]
        if bad:
            raise DataError(f"{path}:{lineno}: column(s) {bad} must be {kind_name(want[bad[0]])}")
        problem = row_problem(row, cfg) if row_problem is not None else None
        if problem:
            raise DataError(f"{path}:{lineno}: {problem}")
        yield lineno, row


def json_rows(path: Path, max_lines: int | None):
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        try:
            rows = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: malformed JSON ({e})") from None
        yield from enumerate(rows, start=1)
        return
    for lineno, line in read_lines(path, max_lines, "JSONL"):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def read_lines(path: Path, max_lines: int | None, kind: str):
    """(line number, text) of a text file, decoded line by line: a stray non-UTF-8 byte or a binary
    file is reported with its file and line instead of a decoder traceback."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if max_lines is not None and lineno > max_lines:
                return
            if b"\0" in raw or (lineno == 1 and raw.startswith((b"PAR1", b"ARROW1"))):
                raise DataError(f"{path}:{lineno}: a binary file (parquet/arrow?), not {kind} text")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
