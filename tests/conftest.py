"""Shared pytest fixtures, for tests/unit and tests/e2e alike. Helper functions live in tests/support/helpers.py.

tests/support goes first on sys.path, so every test file, and every worker started from there, imports its
helpers by plain name (``from helpers import ...``, ``from families import ...``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory):
    """name -> the model.path folder of that family of tests/support/families.py, made once per session, on first use."""
    from families import BY_NAME, make_folder

    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_folder(BY_NAME[name], root / name)
        return made[name]

    return get
