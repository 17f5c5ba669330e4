"""Modules of your own that register what they add (a launcher, a backend, a loss term, a data format),
imported by one rule: an importable module name (a.b.c), never a file path or code, and any failure is
a ConfigError naming where the name came from. The names come from two places: ``FFT_DIST_PLUGINS``
(imported before Hydra composes, so a launcher's options schema exists by then) and ``loss.plugins``
(imported on the launcher for its checks and on every rank before the data and the loss are built)."""
from __future__ import annotations

import importlib
import os
import re
from typing import Iterable

from fft_dist.errors import ConfigError

MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
ENV = "FFT_DIST_PLUGINS"
"""Comma-separated module names, imported before the config is composed (on the launcher and the ranks)."""


def check_names(names: Iterable[object], where: str) -> None:
    for name in names:
        if not isinstance(name, str) or not MODULE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: {name!r} is not an importable module name (a.b.c); "
                              "file paths and code are not accepted")


def import_modules(names: list[str], where: str) -> None:
    """Import each module (it registers what it adds); a ConfigError naming `where` otherwise."""
    check_names(names, where)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is a config error
            raise ConfigError(f"{where}: cannot import {name!r}: {type(e).__name__}: {e} "
                              "(is its folder on PYTHONPATH on every node?)") from e


def env_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]


def import_env_modules() -> None:
    import_modules(env_modules(), ENV)
