"""JSON rows stored with their nested values as JSON text (Format.as_text: chat's messages and tools).

`datasets`' json loader infers one Arrow schema for a column, so rows whose tool schemas or call
arguments differ in shape (an object here, a string there, other keys) fail to load, and keys a row
lacks come back as nulls. Rows go through `datasets.Dataset.from_generator` instead, one string
column per format column, written to Arrow in chunks (memory does not grow with the file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def as_strings(columns: list[str]):
    import datasets

    return datasets.Features({c: datasets.Value("string") for c in columns})


def _rows(read: Callable, path: str, cfg: Any, columns: list[str], as_text: Callable):
    for _, row in read(path, cfg):
        yield as_text({c: row.get(c) for c in columns})


def load_as_text(read: Callable, path: Path, cfg: Any, columns: list[str], as_text: Callable, cache_dir: Path):
    """The rows `read(path, cfg)` yields ((line, row) pairs, checked), as a Dataset of string columns.
    (`columns` goes in as a tuple: from_generator splits a list in gen_kwargs into shards.)"""
    import datasets

    from fft_dist.errors import DataError

    try:
        return datasets.Dataset.from_generator(_rows, features=as_strings(columns), cache_dir=str(cache_dir),
                                               gen_kwargs={"read": read, "path": str(path), "cfg": cfg,
                                                           "columns": tuple(columns), "as_text": as_text})
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise cause if isinstance(cause, DataError) else DataError(f"{path}: not readable as json ({cause})") from None
