"""Hydra multirun (``fft-dist train|launch -m a=1,2 b=x,y``): one job per point, each in its own run dir.

Each point is its own ``fft-dist train|launch`` process (nothing leaks between jobs; stop signals
are passed on to it). The points are the cartesian product of the sweep overrides, parsed by Hydra's own override
grammar (``a=1,2``, ``range(...)``, ``choice(...)``). They run one after another. The run dirs
are ``<run.dir>/<n>``, where ``run.dir`` is resolved once for the whole sweep, so a ``${now:}``
default gives one folder for all points. A point stopped by a signal (exit 75/76) ends the sweep,
and a point that fails does not. The sweep exits with the first failed point's code.
"""
from __future__ import annotations

import itertools
import subprocess
import sys

from fft_dist import exit_codes
from fft_dist.compose import override_keys, prepare, report_known
from fft_dist.config import ConfigError
from fft_dist.preemption import SignalForwarder, StartupInterrupted

STOPPED = (exit_codes.PREEMPTED, exit_codes.STOPPED_NO_CHECKPOINT)


def points(overrides: list[str]) -> list[list[str]]:
    """Every combination of the sweep overrides' values, the plain overrides kept as they are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                   else [o.input_line] for o in parsed]
    except HydraException as e:
        raise ConfigError(f"multirun overrides {overrides}: {e} (list the values instead, e.g. "
                          "parallelism=zero2,zero3)") from None
    return [list(combo) for combo in itertools.product(*choices)]


def run_sweep(command: str, overrides: list[str], *, config_dirs: list[str] | None = None) -> int:
    """Run every point as ``fft-dist <command>`` (train or launch); print a summary on stdout."""
    try:
        grid = points(overrides)
        own_dirs = "run.dir" in override_keys([o for o in overrides if "," in o or "(" in o])
        base = None if own_dirs else prepare(grid[0], config_dirs=config_dirs).cfg.run.dir
    except Exception as e:  # noqa: BLE001 - known errors get their exit code, bugs their traceback
        return report_known(e)
    flags = [f"--config-dir={d}" for d in config_dirs or []]
    SignalForwarder()  # a stop signal goes on to the running point, which checkpoints and exits 75
    results: list[tuple[list[str], int]] = []
    for n, point in enumerate(grid):
        job = point if base is None else [*point, f"run.dir={base}/{n}"]
        print(f"fft-dist: multirun point {n + 1}/{len(grid)}: {' '.join(job)}", flush=True)
        try:
            code = subprocess.run([sys.executable, "-m", "fft_dist.cli", command, *flags, *job], check=False).returncode
        except StartupInterrupted:
            code = exit_codes.STOPPED_NO_CHECKPOINT
        code = 128 - code if code < 0 else code
        results.append((job, code))
        if code in STOPPED:
            print(f"fft-dist: multirun stopped at point {n + 1} (exit {code}); later points not run", file=sys.stderr)
            break
    print("fft-dist: multirun summary")
    for n, (job, code) in enumerate(results):
        print(f"  {n}: exit {code}  {' '.join(job)}")
    return next((code for _, code in results if code), exit_codes.OK)
