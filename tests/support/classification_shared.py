"""Helpers and fixtures moved unchanged from tests/test_classification.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_classification.py,
unit/test_classification.py."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fft_dist.model import BUNDLED_TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)
