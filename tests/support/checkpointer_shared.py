"""Helpers and fixtures moved unchanged from tests/test_checkpointer.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_checkpointer.py,
unit/test_checkpointer.py."""
from __future__ import annotations


PHASES = ("stage", "setup", "write", "gather", "commit")
