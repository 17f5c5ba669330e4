"""Helpers and fixtures moved unchanged from tests/test_data_mixture.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by e2e/test_data_mixture.py,
unit/test_data_mixture.py."""
from __future__ import annotations

import json


def code_rows(path, n: int):
    path.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n" + "    # note\n" * (i % 5),
                                        "completion": f"    return x * {i}" + " + x" * (i % 7) + "\n"}) + "\n"
                            for i in range(n)))
    return path


def prose_rows(path, n: int):
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
    path.write_text("".join(json.dumps({"text": " ".join(words[(i + k) % 8] for k in range(3 + i % 9))}) + "\n"
                            for i in range(n)))
    return path
