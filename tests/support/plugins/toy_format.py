"""A user's own data format, added from outside the package through fft_dist.data.formats.register_format.

Rows hold a question `q` and its answer `a`; each becomes the prompt "Q: <q>\\nA: " (context) and the
completion "<a>" + EOS (loss). Run with ``loss.plugins=[toy_format] data=toy`` (this folder on
PYTHONPATH, ``--config-dir tests/support/toy_conf`` for the yaml): the same plugin list that adds loss terms
registers the format on every rank before the data is built.
"""
from __future__ import annotations

from fft_dist.data.formats import Format, register_format


def prompt(q: str) -> str:
    return f"Q: {q}\nA: "


def encode(enc, batch: dict, indices: list[int], out: dict) -> None:
    prompts = enc.tokenize([prompt(q) for q in batch["q"]])
    answers = enc.tokenize(batch["a"])
    enc.emit_plain(out, list(zip(prompts, answers)), windows=False)


TOY_QA = register_format(Format("toy_qa", encode, fixed_columns={"q": str, "a": str}))
