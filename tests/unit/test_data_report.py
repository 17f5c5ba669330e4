"""`fft-dist data`: the report without training, through the real console entry point."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fft_dist.data import Example
from fft_dist.data.report import render_with_mask, term_lines
from fft_dist.model import BUNDLED_TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


def test_loss_mask_is_shown_in_brackets(tok):
    ids = tok("question? answer.", add_special_tokens=False)["input_ids"]
    n_q = len(tok("question?", add_special_tokens=False)["input_ids"])
    text = render_with_mask(Example(ids, [-100] * n_q + ids[n_q:]), tok)
    assert text == "question?[[ answer.]]"
    assert render_with_mask(Example(ids, ids), tok).startswith(tok.decode(ids[:1]) + "[["), "position 0 has no loss"


def test_many_piece_terms_warn(tok):
    lines, warnings = term_lines(["self", "Zyxwvutsrqponm"], tok)
    assert len(lines) == 4 and "'self'" in lines[0]
    assert len(warnings) == 1 and "Zyxwvutsrqponm" in warnings[0]
