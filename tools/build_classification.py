"""Build the bundled classification set: stdlib docstrings labelled by the family of their module.

Why this data: it needs no network and nothing written by us. It is derived from the bundled
`stdlib_docstrings.jsonl` (itself mined from CPython's standard library), so it regenerates
byte-identically from files in this repository, whatever Python runs the script.

    python tools/build_classification.py --out fft_dist/assets

Each row is one function's docstring (`text`), the family of the module it comes from (`label`)
and where it was found (`source`). A repository tool, not part of the installed package.
"""
from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import inspect
import json
from pathlib import Path

SOURCE_NAME = "stdlib_docstrings.jsonl"
OUT_NAME = "stdlib_families.jsonl"
PER_LABEL = 80
MIN_CHARS, MAX_CHARS = 40, 600

# label -> module path prefixes (relative to the stdlib folder). Fixed, so the set only changes with this table.
FAMILIES = {
    "concurrency": ("asyncio/", "concurrent/", "threading.py", "queue.py", "subprocess.py", "sched.py", "selectors.py"),
    "files": ("pathlib.py", "tarfile.py", "zipfile.py", "shutil.py", "tempfile.py", "os.py", "posixpath.py",
              "ntpath.py", "gzip.py", "fileinput.py", "glob.py"),
    "mail": ("email/", "mailbox.py", "imaplib.py", "smtplib.py", "quopri.py"),
    "network": ("http/", "urllib/", "socket.py", "socketserver.py", "ssl.py", "ftplib.py", "ipaddress.py"),
    "numbers": ("_pydecimal.py", "fractions.py", "statistics.py", "numbers.py", "random.py", "datetime.py",
                "calendar.py"),
}


def family(module: str) -> str | None:
    for label, prefixes in FAMILIES.items():
        if module.startswith(prefixes):
            return label
    return None


def docstring(function_text: str) -> str | None:
    """The function's docstring, dedented (None if the text does not parse or has none)."""
    try:
        tree = ast.parse(function_text)
    except SyntaxError:
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    doc = ast.get_docstring(node, clean=False)
    return inspect.cleandoc(doc) if doc else None


def build(source: Path) -> list[dict]:
    """PER_LABEL rows per family, picked by the hash of their text (a fixed, unbiased sample)."""
    by_label: dict[str, list[dict]] = collections.defaultdict(list)
    seen: set[str] = set()
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        module = row["source"].rsplit(":", 1)[0]
        label = family(module)
        text = docstring(row["text"]) if label else None
        if not text or not MIN_CHARS <= len(text) <= MAX_CHARS or text in seen:
            continue
        seen.add(text)
        by_label[label].append({"text": text, "label": label, "source": row["source"]})
    rows = []
    for label in sorted(FAMILIES):
        found = by_label[label]
        if len(found) < PER_LABEL:
            raise SystemExit(f"{label}: only {len(found)} usable docstrings (need {PER_LABEL})")
        found.sort(key=lambda r: hashlib.sha256(r["text"].encode()).hexdigest())
        rows += sorted(found[:PER_LABEL], key=lambda r: (r["source"].rsplit(":", 1)[0], int(r["source"].rsplit(":", 1)[1])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("fft_dist/assets"))
    args = ap.parse_args()
    rows = build(args.out / SOURCE_NAME)
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    (args.out / OUT_NAME).write_bytes(data)
    counts = collections.Counter(r["label"] for r in rows)
    print(f"{args.out / OUT_NAME}: {len(rows)} rows {dict(sorted(counts.items()))}, {len(data)} bytes, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
