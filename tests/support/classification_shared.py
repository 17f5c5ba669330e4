"""Helpers of tests/test_classification.py, moved here unchanged when the tests were split into unit/ and e2e/:
used by e2e/test_classification.py, unit/test_classification.py."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fft_dist.model import BUNDLED_TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)
