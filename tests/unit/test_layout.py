"""The tests' layout stays as docs/ARCHITECTURE.md describes it: test files only in tests/unit (in-process)
and tests/e2e (real processes), everything else in tests/support. A new tests/test_*.py is listed by name
here until it is moved to where it belongs."""
from __future__ import annotations

from helpers import REPO

TESTS = REPO / "tests"


def test_no_test_file_sits_directly_in_tests():
    offenders = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert not offenders, f"move these into tests/unit (in-process) or tests/e2e (starts processes): {offenders}"


def test_unit_and_e2e_hold_only_test_modules_and_support_holds_none():
    for folder in ("unit", "e2e"):
        stray = sorted(p.name for p in (TESTS / folder).glob("*.py")
                       if not p.name.startswith("test_") and p.name not in ("__init__.py", "conftest.py"))
        assert not stray, f"tests/{folder} holds only test files; helpers go in tests/support: {stray}"
    assert not sorted(p.name for p in (TESTS / "support").rglob("test_*.py")), "test files go in tests/unit or tests/e2e"
