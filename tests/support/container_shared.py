"""Helpers and fixtures moved unchanged from tests/test_container.py when the tests were split into unit/ and e2e/
(issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_container.py,
unit/test_container.py."""
from __future__ import annotations


TIMINGS: dict[str, float] = {}
