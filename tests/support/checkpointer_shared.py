"""Helpers of tests/test_checkpointer.py, moved here unchanged when the tests were split into unit/ and e2e/:
used by e2e/test_checkpointer.py, unit/test_checkpointer.py."""
from __future__ import annotations


PHASES = ("stage", "setup", "write", "gather", "commit")
