"""Shared pytest fixtures. Helper functions live in tests/helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory):
    """name -> the model.path folder of that family of tests/families.py, made once per session, on first use."""
    from families import BY_NAME, make_folder

    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_folder(BY_NAME[name], root / name)
        return made[name]

    return get
