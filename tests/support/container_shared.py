"""Helpers of tests/e2e/test_container.py, moved here unchanged when the tests were split into unit/ and e2e/:
used by e2e/test_container.py, unit/test_container.py."""
from __future__ import annotations


TIMINGS: dict[str, float] = {}
