"""Helpers and fixtures moved unchanged from tests/test_data_checks.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_data_checks.py,
unit/test_data_checks.py."""
from __future__ import annotations

import json

import pytest

from fft_dist.data import sources


BAD_LINE = sources.PRECHECK_LINES + 5


@pytest.fixture(scope="module")
def long_jsonl(tmp_path_factory):
    """A real JSONL file of PRECHECK_LINES + 10 tiny rows, malformed at line PRECHECK_LINES + 5."""
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c"}) + "\n"
    with path.open("w") as f:
        f.write(good * (BAD_LINE - 1) + '{"prompt": "p", "completion": \n' + good * 5)
    return path
