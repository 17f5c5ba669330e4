"""Helpers and fixtures moved unchanged from tests/test_loss_terms.py when the tests were split into unit/ and e2e/
(issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_loss_terms.py,
unit/test_loss_terms.py."""
from __future__ import annotations

from helpers import SUPPORT


PLUGINS = SUPPORT / "plugins"
