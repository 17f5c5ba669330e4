"""Helpers and fixtures moved unchanged from tests/test_checkpoint_storage.py when the tests were split into unit/
and e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by
e2e/test_checkpoint_storage.py, unit/test_checkpoint_storage.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_helpers import llama_checkpoint


# -- export: never into a non-empty folder by accident, never half-written (issue #8.10) -----------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return llama_checkpoint(tmp_path_factory.mktemp("llama") / "ckpts")
