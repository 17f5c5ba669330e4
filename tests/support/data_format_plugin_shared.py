"""Helpers and fixtures moved unchanged from tests/test_data_format_plugin.py when the tests were split into unit/
and e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by
e2e/test_data_format_plugin.py, unit/test_data_format_plugin.py."""
from __future__ import annotations

import json

from helpers import SUPPORT


PLUGINS = SUPPORT / "plugins"


ROWS = [{"q": f"what is {i} plus {i}?", "a": f"{2 * i}, since {i} and {i} make {2 * i}."} for i in range(40)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
