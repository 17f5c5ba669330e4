"""Helpers of tests/e2e/test_loss_terms.py, moved here unchanged when the tests were split into unit/ and e2e/:
used by e2e/test_loss_terms.py, unit/test_loss_terms.py."""
from __future__ import annotations

from helpers import SUPPORT


PLUGINS = SUPPORT / "plugins"
