"""data.format=text: loss on every token (+ EOS), BOS first as the tokenizer does; with data.stride a long
document becomes windows; .txt files are read by line, paragraph or document (data.sample_by)."""
from __future__ import annotations

from fft_dist.data.formats.registry import Format, register_format


def encode(enc, batch: dict, indices: list[int], out: dict) -> None:
    pairs = [([], t) for t in enc.tokenize(batch[enc.cfg.text_key])]
    enc.emit_plain(out, pairs, windows=enc.cfg.stride > 0)


TEXT = register_format(Format("text", encode, columns={"text_key": str}, options=("stride", "add_bos", "add_eos", "sample_by")))
