"""Build the bundled default data set and tokenizer from CPython's own standard library.

Why the stdlib: it is real, varied, PSF-licensed text that ships with every Python, so the
default corpus needs no network, no download and nothing written by us. Each row pairs a
function's signature and docstring (the prompt) with the body that follows (the completion).

    python tools/build_corpus.py --out fft_dist/assets

A repository tool, not part of the installed package. Everything is deterministic (fixed module
list, sorted rows, single-threaded BPE training), so the same Python and `tokenizers` versions
regenerate byte-identical files.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import statistics
import sys
import sysconfig
import tokenize
from pathlib import Path

CORPUS_NAME = "stdlib_docstrings.jsonl"
TOKENIZER_DIR = "tokenizer"
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]  # ids 0 and 1
MIN_CHARS, MAX_CHARS = 80, 2000  # the upper cap keeps the JSONL under 4 MB

# Pure-Python stdlib modules, relative to the stdlib folder. Fixed and sorted so the corpus
# only changes when this list (or the Python version) does. Missing files are skipped.
MODULES = sorted([
    "_pydecimal.py", "argparse.py", "ast.py", "asyncio/base_events.py", "asyncio/events.py",
    "asyncio/locks.py", "asyncio/tasks.py", "base64.py", "bdb.py", "bisect.py", "calendar.py",
    "cmd.py", "code.py", "codecs.py", "collections/__init__.py", "concurrent/futures/_base.py",
    "concurrent/futures/process.py", "concurrent/futures/thread.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "dis.py",
    "doctest.py", "email/_header_value_parser.py", "email/_parseaddr.py", "email/_policybase.py",
    "email/base64mime.py", "email/charset.py", "email/encoders.py", "email/feedparser.py",
    "email/generator.py", "email/header.py", "email/headerregistry.py", "email/iterators.py",
    "email/message.py", "email/parser.py", "email/policy.py", "email/quoprimime.py",
    "email/utils.py", "enum.py", "fileinput.py", "fnmatch.py", "fractions.py", "ftplib.py",
    "functools.py", "glob.py", "gzip.py", "heapq.py", "hmac.py", "html/parser.py",
    "http/client.py", "http/cookiejar.py", "http/cookies.py", "http/server.py", "imaplib.py",
    "importlib/_bootstrap_external.py", "inspect.py", "ipaddress.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "linecache.py", "locale.py", "logging/__init__.py",
    "logging/config.py", "logging/handlers.py", "mailbox.py", "mimetypes.py", "ntpath.py",
    "numbers.py", "optparse.py", "os.py", "pathlib.py", "pdb.py", "pickle.py", "pkgutil.py",
    "platform.py", "plistlib.py", "posixpath.py", "pprint.py", "pstats.py", "pydoc.py",
    "queue.py", "quopri.py", "random.py", "reprlib.py", "sched.py", "secrets.py", "selectors.py",
    "shlex.py", "shutil.py", "smtplib.py", "socket.py", "socketserver.py", "ssl.py",
    "statistics.py", "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py",
    "threading.py", "timeit.py", "tokenize.py", "traceback.py", "types.py", "typing.py",
    "unittest/case.py", "unittest/mock.py", "urllib/parse.py", "urllib/request.py", "uuid.py",
    "warnings.py", "weakref.py", "xml/etree/ElementTree.py", "zipfile.py",
])


def read_lines(path: Path) -> list[str]:
    """Source lines with their newlines. Split on '\\n' only: str.splitlines also breaks on form
    feeds and the like, which would shift ast's line numbers."""
    with tokenize.open(path) as f:  # honours the coding cookie; universal newlines
        text = f.read()
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def dedent(lines: list[str], col: int) -> list[str] | None:
    """Strip the def's own indentation; None if some line is indented less (e.g. inside a
    multi-line string), since cutting it would corrupt the source."""
    out = []
    for line in lines:
        if line[:col].strip(" \t\n"):
            return None
        out.append(line[col:] if len(line) > col else line.lstrip(" \t"))
    return out


def function_rows(relpath: str, lines: list[str], tree: ast.Module) -> list[dict]:
    """One row per function or method that has a docstring and some body after it."""
    rows = []
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(funcs, key=lambda n: (n.lineno, n.col_offset)):
        if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno
        if node.body[1].lineno <= doc_end:  # `"""doc"""; x = 1` on one line: no clean split
            continue
        # node.lineno is the `def` line (decorators excluded); line numbers are 1-based.
        src = dedent(lines[node.lineno - 1 : node.end_lineno], node.col_offset)
        if src is None or not src[-1].endswith("\n"):
            continue
        split = doc_end - node.lineno + 1
        prompt, completion = "".join(src[:split]), "".join(src[split:])
        text = prompt + completion
        if not completion.strip() or not MIN_CHARS <= len(text) <= MAX_CHARS:
            continue
        rows.append({"prompt": prompt, "completion": completion, "text": text,
                     "source": f"{relpath}:{node.lineno}"})
    return rows


def build_rows(stdlib: Path) -> tuple[list[dict], list[str]]:
    """All rows, in module then line order, deduplicated by text (first occurrence wins)."""
    rows, used, seen = [], [], set()
    for relpath in MODULES:
        path = stdlib / relpath
        if not path.is_file():
            print(f"skip (missing in this Python): {relpath}", file=sys.stderr)
            continue
        lines = read_lines(path)
        tree = ast.parse("".join(lines), filename=str(path))
        used.append(relpath)
        for row in function_rows(relpath, lines, tree):
            if row["text"] not in seen:
                seen.add(row["text"])
                rows.append(row)
    return rows, used


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def train_tokenizer(texts: list[str], out_dir: Path) -> None:
    """Byte-level BPE (GPT-2 style) saved as a transformers folder. Bytes cover everything, so
    no <unk> is needed; <|endoftext|> doubles as bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1]:
        raise SystemExit(f"special tokens {SPECIAL_TOKENS} must be ids 0 and 1")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact source text
    )
    fast.save_pretrained(str(out_dir))
    # Record the generic fast-tokenizer class rather than the backend name transformers 5 writes:
    # every transformers release resolves it, and it keeps the committed file unchanged.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def check_tokenizer(tok_dir: Path, texts: list[str], prompts: list[str]) -> dict:
    """Reload the saved folder the way the trainer does (offline) and measure the corpus with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    bad = [i for i, (t, x) in enumerate(zip(texts, ids)) if tok.decode(x) != t]
    if bad:
        raise SystemExit(f"tokenizer does not round-trip {len(bad)} rows (first: row {bad[0]})")
    lens = [len(x) for x in ids]
    prompt_lens = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
    return {
        "vocab": len(tok),
        "eos_id": tok.eos_token_id,
        "pad_id": tok.pad_token_id,
        "rows": len(lens),
        "mean_tokens": round(statistics.fmean(lens), 1),
        "median_tokens": statistics.median(lens),
        "max_tokens": max(lens),
        "frac_under_256": round(sum(n < 256 for n in lens) / len(lens), 3),
        "chars_per_token": round(sum(map(len, texts)) / sum(lens), 2),
        # prompt_completion rows whose prompt alone fills max_length=256 have no loss and are dropped
        "frac_prompt_ge_256": round(sum(n >= 256 for n in prompt_lens) / len(prompt_lens), 3),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


README = """\
# Bundled default data and tokenizer

Generated by `tools/build_corpus.py` (in the repository, not in the installed package); do not
edit by hand. Regenerate from the repository root with

    python tools/build_corpus.py --out fft_dist/assets

The same Python and `tokenizers` versions give byte-identical files (checksums below).

## `{corpus}`

Docstring -> body pairs mined with `ast` from CPython {python}'s own standard library source
(the fixed module list is `MODULES` in the script; {used} of {listed} modules were present).
One JSON object per line, sorted by module then line:

- `prompt`: the `def` line(s) and the docstring, as the function starts in the source
  (methods dedented so `def` is at column 0);
- `completion`: the rest of the function body (loss falls here in `prompt_completion` format);
- `text`: `prompt + completion`, the whole function (for the `text` format);
- `source`: `module_relpath:lineno` in that CPython version.

Functions whose text is under {min_chars} or over {max_chars} characters, or with no body after
the docstring, are left out; duplicates (by text) are dropped.

- rows: {rows}; text characters: mean {mean_chars}, median {median_chars}
- size: {size} bytes; sha256 `{corpus_sha}`

Licence: the text is taken from the Python standard library and is covered by the
Python Software Foundation License (PSF-2.0), not by this project's licence.

## `{tok_dir}/`

Byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer without prefix space, ByteLevel decoder)
trained single-threaded with `tokenizers` {tokenizers} on the `text` field above.
Vocabulary {vocab}; `<|endoftext|>` = 0 (bos and eos), `<|pad|>` = 1; no unk token (bytes
cover everything). Saved with `transformers` {transformers}; `tokenizer_class` is written as
the generic `PreTrainedTokenizerFast`. Load with `transformers.AutoTokenizer.from_pretrained(path)`.

Tokens per row of `text`: mean {mean_tokens}, median {median_tokens}, max {max_tokens};
{pct_under_256}% of rows are under 256 tokens; {chars_per_token} characters per token.
In {pct_prompt_ge_256}% of rows the prompt alone is 256 tokens or more: at `max_length: 256` the
`prompt_completion` loader drops those (no loss tokens left after truncation).

{tok_shas}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fft_dist" / "assets",
                   help="output folder (default: the package's assets folder, fft_dist/assets)")
    args = p.parse_args(argv)
    # Pin BPE training to one thread so merges cannot depend on scheduling (tokenizers 0.23 was also
    # deterministic multi-threaded; this is cheap insurance). Set before tokenizers starts its pool,
    # which happens on first use, inside train_tokenizer.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["RAYON_RS_NUM_CPUS"] = "1"

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows, used = build_rows(stdlib)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / CORPUS_NAME
    write_jsonl(rows, corpus)
    chars = [len(r["text"]) for r in rows]
    python = sys.version.split()[0]
    print(f"python {python}: {len(used)}/{len(MODULES)} modules, {len(rows)} rows, "
          f"{corpus.stat().st_size} bytes")

    tok_dir = args.out / TOKENIZER_DIR
    texts = [r["text"] for r in rows]
    train_tokenizer(texts, tok_dir)
    stats = check_tokenizer(tok_dir, texts, [r["prompt"] for r in rows])
    print("tokenizer:", json.dumps(stats))

    import tokenizers
    import transformers

    files = [corpus, *sorted(tok_dir.iterdir())]
    (args.out / "README.md").write_text(README.format(
        corpus=CORPUS_NAME, python=python, used=len(used), listed=len(MODULES),
        min_chars=MIN_CHARS, max_chars=MAX_CHARS,
        mean_chars=round(statistics.fmean(chars)), median_chars=round(statistics.median(chars)),
        size=corpus.stat().st_size, corpus_sha=sha256(corpus), tok_dir=TOKENIZER_DIR,
        tokenizers=tokenizers.__version__, transformers=transformers.__version__,
        pct_under_256=round(100 * stats["frac_under_256"], 1),
        pct_prompt_ge_256=round(100 * stats["frac_prompt_ge_256"], 1),
        tok_shas="\n".join(f"- `{f.name}` sha256 `{sha256(f)}`" for f in files[1:]),
        **stats,
    ), encoding="utf-8")
    for f in [*files, args.out / "README.md"]:
        print(f"{f}: sha256 {sha256(f)}")


if __name__ == "__main__":
    main()
