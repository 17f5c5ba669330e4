"""Helpers and fixtures moved unchanged from tests/test_data_formats.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_data_formats.py,
unit/test_data_formats.py."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from fft_dist.config import DataConfig
from fft_dist.data import load_datasets
from fft_dist.model import BUNDLED_TOKENIZER


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, tok, path, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return load_datasets(DataConfig(path=path, **kw), tok, cache_dir=tmp_path / "cache")
