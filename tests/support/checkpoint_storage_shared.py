"""Helpers of tests/test_checkpoint_storage.py, moved here unchanged when the tests were split into unit/ and e2e/:
used by e2e/test_checkpoint_storage.py, unit/test_checkpoint_storage.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_helpers import llama_checkpoint


# -- export: never into a non-empty folder by accident, never half-written (issue #8.10) -----------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return llama_checkpoint(tmp_path_factory.mktemp("llama") / "ckpts")
