"""`fft-dist train --help` / `--info`: the config menu (groups and every option) without launching.

The option texts are the field docstrings of :mod:`fft_dist.config`, so the help can never drift
from the schema.
"""
from __future__ import annotations

import ast
import dataclasses
import sys
import typing
from enum import Enum
from pathlib import Path

from fft_dist import config as schema
from fft_dist.config import FFTConfig, conf_dir

USAGE = """usage: fft-dist train [--config-dir DIR ...] [--cfg job] [--info] [--help] [key=value ...]

  key=value        Hydra overrides: pick a group option (model=llama3_1b) or set a field (train.lr=1e-4)
  --cfg job        print the composed, resolved config and exit (nothing is launched)
  --info           print where configs come from and the groups on offer, then exit
  --config-dir DIR also search DIR for group files, e.g. DIR/model/my_model.yaml -> model=my_model
"""


def _field_docs() -> dict[tuple[str, str], str]:
    """(dataclass name, field name) -> the docstring written under the field, in every module of the
    config package (one per section)."""
    docs: dict[tuple[str, str], str] = {}
    for path in sorted(Path(schema.__file__).parent.glob("*.py")):
        docs.update(_docs_of(path))
    return docs


def _docs_of(path: Path) -> dict[tuple[str, str], str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs: dict[tuple[str, str], str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for i, stmt in enumerate(body[:-1]):
            nxt = body[i + 1]
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[(node.name, stmt.target.id)] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp) -> str:
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "|".join(m.value for m in tp)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "?"
    return value.value if isinstance(value, Enum) else value


def options() -> list[tuple[str, str, object, str]]:
    """(dotted key, type, schema default, docstring) for every leaf option."""
    docs = _field_docs()
    out = []

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if "variants" in f.metadata:  # one schema per group option (launcher=slurm, optimizer=sgd)
                _variants(f.metadata["variants"], f"{prefix}{f.name}", docs, out)
            elif dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", _type_name(tp), _default(f), docs.get((cls.__name__, f.name), "")))

    walk(FFTConfig, "")
    return out


def _variants(group, key: str, docs: dict, out: list) -> None:
    """Each option of a group whose options have their own fields, once: the fields every option has
    first, then each option's own, tagged with the options that have it ([launcher=slurm])."""
    rows: dict[str, list] = {}
    for cls in [group.base, *group.schemas.values()]:
        if not cls.__module__.startswith(schema.__name__ + "."):  # a plugin's schema: its own module's docstrings
            docs = {**_docs_of(Path(sys.modules[cls.__module__].__file__)), **docs}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            row = rows.setdefault(f.name, [_type_name(hints[f.name]), _default(f), ""])
            row[2] = row[2] or next((docs[(c.__name__, f.name)] for c in cls.__mro__ if (c.__name__, f.name) in docs), "")
    for name, (tp, default, doc) in rows.items():
        owners = group.owners(name)
        only = "" if len(owners) == len(group.schemas) else f"[{key}={'|'.join(owners)}] "
        out.append((f"{key}.{name}", tp, default, (only + doc).strip()))


def groups() -> dict[str, list[str]]:
    root = conf_dir()
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir()) if d.is_dir()}


def help_text() -> str:
    lines = [USAGE, "config groups (pick one with group=option; default in conf/config.yaml):"]
    for group, opts in groups().items():
        lines.append(f"  {group:<12} {', '.join(opts)}")
    lines += ["", "options (schema default; the groups and conf/config.yaml may set others, see --cfg job):"]
    for key, tp, default, doc in options():
        lines.append(f"  {key} : {tp} = {default!r}")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def info_text(config_dirs: list[str]) -> str:
    lines = [f"bundled configs: {conf_dir()}"]
    lines += [f"extra config dir: {Path(d).resolve()}" for d in config_dirs]
    lines.append("groups:")
    lines += [f"  {g}: {', '.join(o)}" for g, o in groups().items()]
    return "\n".join(lines)
