"""Shared pytest fixtures, for tests/unit and tests/e2e alike. Helper functions live in tests/support/helpers.py.

tests/support goes first on sys.path, so every test file, and every worker started from there, imports its
helpers by plain name (``from helpers import ...``, ``from families import ...``)."""
from __future__ import annotations

import os
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


RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What makes `fft-dist train` believe a launcher started it as a rank (fft_dist.launch.launched_by_launcher)."""


_last_test = [None]


@pytest.fixture(autouse=True)
def _environment_as_it_was(request):
    """Every test leaves os.environ as it found it. Code run in pytest's own process may set variables (a
    one-process init_distributed sets RANK and WORLD_SIZE); left behind, they would make a later in-process
    `fft-dist train` run as a rank, train here and end pytest with os._exit, silently."""
    leaked = sorted(set(RANK_ENV) & set(os.environ))
    if leaked:  # set outside any test's own scope (a module or session fixture): fail here once, not every test after
        for key in leaked:
            del os.environ[key]
        pytest.fail(f"rank variables {leaked} were left in pytest's environment by a fixture wider than one test; "
                    f"removed (a test after {_last_test[0]!r} would otherwise have run as a rank)")
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    _last_test[0] = request.node.nodeid
