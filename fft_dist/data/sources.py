"""Local data sources: resolve `data.path` into files, check them cheaply, and load them with `datasets`.

A source is a file, a glob, a list of those, or a `save_to_disk` folder. Nothing is downloaded:
a name that looks like a hub data set and is not a local path is refused with what to do instead.
The pre-launch check reads no tokenizer and converts nothing, so it stays cheap; its errors name
the file and the line (JSONL) or what was found (columnar files).
"""
from __future__ import annotations

import glob
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fft_dist.config import DataConfig
from fft_dist.data.encode import SPECIAL_CHOICES
from fft_dist.data.formats import all_formats, get_format
from fft_dist.data.file_rows import (PRECHECK_LINES, arrow_holds, columnar_schema, csv_header, iter_json_rows, json_rows,
                                     kind_name, optional_kind, read_lines, text_rows)
from fft_dist.data.json_text import as_strings, load_as_text
from fft_dist.errors import ConfigError, DataError

SAMPLE_BY = ("line", "paragraph", "document")
"""data.sample_by: how `datasets`' text loader cuts a .txt file into rows (its own option and names)."""
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
           ".arrow": "arrow"}
"""File extension -> `datasets` packaged loader."""
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """One local file (loaded by `loader`) or one `save_to_disk` folder (loader 'disk')."""

    path: Path
    loader: str


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [str(v) for v in value]
    return [str(value)]


def resolve_sources(value: Any, *, key: str = "data.path") -> list[Source]:
    """Every local file or dataset folder that `value` names, in a stable order."""
    entries = _as_list(value)
    if not entries:
        raise ConfigError(f"{key} is empty; give a file, a glob, a list of files or a save_to_disk folder")
    out: list[Source] = []
    for entry in entries:
        if any(ch in entry for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{key}: the glob {entry!r} matches no file")
            out.extend(_file_source(p, key) for p in matches)
            continue
        path = Path(entry)
        if path.is_dir():
            out.append(_folder_source(path, key))
        elif path.is_file():
            out.append(_file_source(path, key))
        elif not path.suffix and _HUB_NAME.match(entry) and not entry.startswith((".", "/", "~")):
            raise DataError(f"{key}={entry!r} is not a local path, and hub data sets are not available offline; "
                            f"download it (e.g. `datasets.load_dataset(...).save_to_disk(dir)` or its files) "
                            f"and point {key} at the files")
        else:
            raise DataError(f"{key}={entry!r} does not exist")
    return out


def _file_source(path: Path, key: str) -> Source:
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(f"{key}: {path}: unknown file type {path.suffix or '(no extension)'!r}; "
                        f"use one of {sorted(LOADERS)} or a save_to_disk folder")
    return Source(path, loader)


def _folder_source(path: Path, key: str) -> Source:
    if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return Source(path, "disk")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{key}: {path} holds several splits {splits}; point {key} at one of them "
                        f"(e.g. {path / (splits[0] if splits else 'train')})")
    raise DataError(f"{key}: {path} is a directory but not a save_to_disk dataset folder; "
                    "point it at the data files (a glob such as dir/*.jsonl works)")


# -- the cheap pre-launch check ------------------------------------------------------------------------
def expected_columns(cfg: DataConfig, found=None) -> dict[str, Any]:
    """The columns the format reads (from a source holding the columns `found`, where the format's layout
    depends on them), with the Python type(s) a JSON row must hold there."""
    fmt = get_format(cfg.format)
    return fmt.column_names(cfg) if found is None else fmt.columns_in(cfg, found)


def check_options(cfg: DataConfig) -> None:
    """Options that only make sense for some formats are refused elsewhere, not silently ignored."""
    fmt = get_format(cfg.format)
    if not 0 <= cfg.stride <= cfg.max_length:
        raise ConfigError(f"data.stride={cfg.stride} must be in [0, data.max_length={cfg.max_length}] (0: truncate)")
    defaults = DataConfig()
    for option in dict.fromkeys(o for f in all_formats() for o in f.options):
        if option not in fmt.options and getattr(cfg, option) != getattr(defaults, option):
            owners = "/".join(f.name for f in all_formats() if option in f.options)
            raise ConfigError(f"data.{option} applies to data.format={owners} only (the format is {cfg.format})")
    for key, choices in (("add_bos", SPECIAL_CHOICES), ("add_eos", SPECIAL_CHOICES), ("sample_by", SAMPLE_BY)):
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"data.{key}={getattr(cfg, key)!r} must be one of {', '.join(choices)}")
    if cfg.num_proc < 1:
        raise ConfigError("data.num_proc must be >= 1")
    if cfg.group_by_length < 0:
        raise ConfigError(f"data.group_by_length={cfg.group_by_length} must be >= 0 (0: off)")
    if cfg.group_by_length and cfg.packing:
        raise ConfigError("data.group_by_length applies to unpacked rows only (packed rows are all close to "
                          "data.max_length); set one of data.packing / data.group_by_length")
    if fmt.packing and cfg.packing:
        raise ConfigError(f"data.packing does not apply to data.format={cfg.format}: {fmt.packing}; set data.packing=false")
    column_options = sorted({o for f in all_formats() for o in f.columns})
    unused = [f"data.{option}={getattr(cfg, option)!r}" for option in column_options
              if option not in fmt.columns and getattr(cfg, option) != getattr(defaults, option)]
    if unused:
        reads = ", ".join("data." + o for o in fmt.columns) or ", ".join(fmt.fixed_columns)
        raise ConfigError(f"{', '.join(unused)}: data.format={cfg.format} does not read this column (it reads {reads})")


def check_data_files(cfg: DataConfig) -> None:
    """Before launch: the sources exist, decode, parse and have the columns of the right types (no
    tokenizer, no conversion), and a data.chat_template file exists.

    With data.mixture, every source is checked, and each error names its entry (data.mixture.<name>).
    """
    from fft_dist.data.mixture import source_configs

    for where, source_cfg in source_configs(cfg):
        fmt = get_format(source_cfg.format, where)
        check_options(source_cfg)
        if fmt.check is not None:
            fmt.check(source_cfg, where)
        counts = {}
        for key, value in ((f"{where}.path", source_cfg.path), (f"{where}.eval_path", source_cfg.eval_path)):
            if value is None:
                continue
            sources = resolve_sources(value, key=key)
            if source_cfg.sample_by != "line" and not any(s.loader == "text" for s in sources):
                raise ConfigError(f"{where}.sample_by={source_cfg.sample_by} reads .txt files, and {key}={value} "
                                  "names none; drop the option")
            rows = sum(check_source(s, source_cfg) for s in sources)
            if not rows:
                raise DataError(f"{key}={value}: the data set is empty (no rows)")
            counts[key] = None if any(s.loader == "arrow" for s in sources) else rows  # arrow: not counted here
        _warn_no_eval(source_cfg, where, counts.get(f"{where}.path"))


def _warn_no_eval(cfg: DataConfig, where: str, rows: int | None) -> None:
    """A held-out share that rounds to no row: the run would have no eval loss and no best checkpoint."""
    if cfg.eval_path is not None or not cfg.eval_fraction or rows is None or held_out_rows(rows, cfg.eval_fraction):
        return
    enough = f" or {where}.eval_fraction={math.ceil(100 / rows) / 100:g} or more" if rows > 1 else ""
    print(f"fft-dist: warning: {where}.path has {rows} row(s) and {where}.eval_fraction={cfg.eval_fraction} holds "
          f"out none, so there is no eval split (no eval loss, no best checkpoint); set {where}.eval_path=<file>"
          f"{enough}", file=sys.stderr, flush=True)


def held_out_rows(n: int, fraction: float) -> int:
    """How many of n rows data.eval_fraction holds out (0 for a small set and a small fraction)."""
    return int(round(n * fraction))


def check_source(source: Source, cfg: DataConfig) -> int:
    """Rows found (JSONL and text: within the first PRECHECK_LINES lines); raises DataError naming the file."""
    want = expected_columns(cfg)
    if source.loader == "json":
        return sum(1 for _ in iter_json_rows(source.path, want, cfg, max_lines=PRECHECK_LINES))
    if source.loader == "text":
        _have(source.path, ["text"], expected_columns(cfg, ["text"]))
        return text_rows(source.path, cfg.sample_by)
    schema, rows = columnar_schema(source.path, source.loader)
    want = expected_columns(cfg, schema.names)
    _have(source.path, list(schema.names), want)
    for column, kind in want.items():
        if column not in schema.names:
            continue  # an optional column (chat's tools)
        found = schema.field(column).type
        if not arrow_holds(found, kind):
            raise DataError(f"{source.path}: column {column!r} is {found}, but data.format={cfg.format} reads "
                            f"it as {kind_name(kind)}; convert the column (or point data.*_key at another one)")
    return rows


def _have(path: Path, found: list[str], want: dict[str, type]) -> None:
    missing = [k for k, t in want.items() if k not in found and not optional_kind(t)]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(want)}, found {sorted(found)}")


def columns_of(source: Source, rows: int = 100) -> list[str]:
    """The columns a source holds (JSON: the keys of its first `rows` rows), without loading it."""
    if source.loader == "json":
        keys: dict[str, None] = {}
        for _, row in json_rows(source.path, rows):
            keys.update(dict.fromkeys(row if isinstance(row, dict) else ()))
        return list(keys)
    return ["text"] if source.loader == "text" else list(columnar_schema(source.path, source.loader)[0].names)


# -- loading (on the rank that builds the cache) -----------------------------------------------------------
@dataclass
class Loaded:
    """The rows of one split's sources, concatenated, and which file each row came from."""

    dataset: Any
    files: list[Path]
    starts: list[int]

    def name_row(self, index: int) -> str:
        """'file: row N' (1-based within its file) for the concatenated row `index`."""
        import bisect

        k = bisect.bisect_right(self.starts, index) - 1
        return f"{self.files[k]}: row {index - self.starts[k] + 1}"


def load_sources(value: Any, cfg: DataConfig, *, key: str, work_dir: Path) -> Loaded:
    """Load every source of one split with `datasets` (local packaged loaders, no network)."""
    import datasets

    fmt = get_format(cfg.format)
    parts, files, starts, total = [], [], [], 0
    for source in resolve_sources(value, key=key):
        ds = None
        if source.loader == "json":  # line-exact errors before pyarrow's own, less precise ones
            if not sum(1 for _ in iter_json_rows(source.path, expected_columns(cfg), cfg)):
                continue  # an empty file adds no rows (the json loader cannot read it)
            if fmt.as_text is not None:  # the first row's layout names the columns
                columns = list(expected_columns(cfg, next((r for _, r in json_rows(source.path, None)), {})))
                ds = load_as_text(_checked_rows, source.path, cfg, columns, fmt.as_text, work_dir / "hf")
        elif source.path.is_file() and not source.path.stat().st_size:
            continue
        elif source.loader in ("text", "csv"):
            for _ in read_lines(source.path, None, source.loader):
                pass  # every line decodes (the pre-launch check read the first PRECHECK_LINES)
        if ds is None:
            ds = _load(source, cfg, fmt, work_dir, len(parts))
        parts.append(ds)
        files.append(source.path)
        starts.append(total)
        total += len(ds)
    if not total:
        raise DataError(f"{key}={value}: the data set is empty (no rows)")
    try:
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise DataError(f"{key}={value}: the sources hold different columns ({e}); give sources of one layout, "
                        "or one data.mixture entry per layout") from None
    return Loaded(dataset, files, starts)


def _load(source: Source, cfg: DataConfig, fmt, work_dir: Path, n: int):
    import datasets

    extra = {}
    if source.loader == "text":  # by line, paragraph or document: the loader's own option
        extra["sample_by"] = cfg.sample_by
    if source.loader == "csv":  # text, not numbers: a column of digits stays the strings it holds
        extra["features"] = datasets.Features({name: datasets.Value("string") for name in csv_header(source.path)})
    try:
        if source.loader == "disk":
            ds = datasets.load_from_disk(str(source.path))
        else:
            ds = datasets.load_dataset(source.loader, data_files=[str(source.path)], split="train",
                                       cache_dir=str(work_dir / "hf"), **extra)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise DataError(f"{source.path}: could not be read as {source.loader} ({type(e).__name__}: {e})") from None
    want = expected_columns(cfg, ds.column_names)
    _have(source.path, list(ds.column_names), want)
    ds = ds.select_columns([c for c in want if c in ds.column_names] + _optional_columns(cfg, ds.column_names))
    if fmt.as_text is not None:  # the same column types as a JSON source's, so they concatenate
        ds = ds.map(fmt.as_text, features=as_strings(ds.column_names), desc="fft-dist: reading",
                    cache_file_name=str(work_dir / f"as-text-{n}.arrow"))
    return ds


def _checked_rows(path: str, cfg: DataConfig):
    return iter_json_rows(path, expected_columns(cfg), cfg)


def _optional_columns(cfg: DataConfig, names: list[str]) -> list[str]:
    return [c for c in get_format(cfg.format).optional_columns if c in names]
