"""Helpers and fixtures moved unchanged from tests/test_data_packing.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_data_packing.py,
unit/test_data_packing.py."""
from __future__ import annotations

import json


def short_rows(path, n: int = 48):
    path.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n" + "    # note\n" * (i % 5),
                                        "completion": f"    return x * {i}" + " + x" * (i % 7) + "\n"}) + "\n"
                            for i in range(n)))
    return path
