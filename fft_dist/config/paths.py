"""Where the package finds its bundled conf/ tree and assets (a wheel carries both)."""
from __future__ import annotations

import os
from pathlib import Path


PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The fft_dist package folder (this module lives in its config/ package)."""


ASSETS_DIR = PACKAGE_DIR / "assets"


def conf_dir() -> Path:
    """The conf/ tree: FFT_DIST_CONF_DIR, else the package's own copy.

    In git, fft_dist/conf is a symlink to the top-level conf/ (the menu users read), so wheels
    and sdists carry real files and every install finds them here. A checkout made without
    symlink support leaves a plain file there; then the top-level conf/ is used.
    """
    env = os.environ.get("FFT_DIST_CONF_DIR")
    if env:
        return Path(env).resolve()
    bundled = PACKAGE_DIR / "conf"
    return bundled if bundled.is_dir() else PACKAGE_DIR.parent / "conf"
