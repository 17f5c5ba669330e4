"""Fault injection for crash-safety tests: SIGKILL this process at a named point of a save or export.

Set ``FFT_DIST_FAULT_KILL_AT`` to one of :data:`FAULT_POINTS`; optionally
``FFT_DIST_FAULT_KILL_RANK`` (default 0, or ``all``) and ``FFT_DIST_FAULT_KILL_STEP`` (only the
save of that step). With ``FFT_DIST_FAULT_DELAY_S`` the point pauses that many seconds instead of
killing: a test can then land a stop signal while an asynchronous save is being written. An unknown point name is an error, so a typo cannot make a crash test pass
without crashing anything. Unset (the normal case), :func:`fault_point` costs one env lookup.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from fft_dist.dist import rank_world

KILL_AT_ENV = "FFT_DIST_FAULT_KILL_AT"
KILL_RANK_ENV = "FFT_DIST_FAULT_KILL_RANK"
KILL_STEP_ENV = "FFT_DIST_FAULT_KILL_STEP"
DELAY_ENV = "FFT_DIST_FAULT_DELAY_S"

FAULT_POINTS = (
    "mid_stage",            # a rank is half-way through staging its fragments (training is blocked)
    "mid_model_shard",      # a rank is half-way through writing its model shard
    "after_model_shards",
    "after_optim_shards",
    "before_index",         # rank 0, every rank's shards are written
    "before_manifest",
    "before_rename",        # the manifest is written, step-N.tmp is not renamed yet
    "before_latest",        # step-N is committed, `latest` still names the previous one
    "before_prune",
    "mid_export",           # export: the first output shard is written into the temporary folder
)


def check_fault_env() -> None:
    """Raise ValueError when the env names an unknown fault point (or a bad rank/step)."""
    where = os.environ.get(KILL_AT_ENV)
    if where in (None, ""):
        return
    if where not in FAULT_POINTS:
        raise ValueError(f"{KILL_AT_ENV}={where!r} is not a fault point; valid points: {', '.join(FAULT_POINTS)}")
    rank = os.environ.get(KILL_RANK_ENV, "0")
    step = os.environ.get(KILL_STEP_ENV, "")
    if not (rank == "all" or rank.isdigit()) or not (step == "" or step.lstrip("-").isdigit()):
        raise ValueError(f"{KILL_RANK_ENV}={rank!r} / {KILL_STEP_ENV}={step!r}: expected a rank number or 'all', "
                         f"and a step number")
    delay = os.environ.get(DELAY_ENV, "")
    try:
        if delay and not 0 <= float(delay) <= 3600:
            raise ValueError
    except ValueError:
        raise ValueError(f"{DELAY_ENV}={delay!r}: expected seconds (0 to 3600)") from None


def fault_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process here if the env asks for point `name` (at `step`, on this rank)."""
    if name not in FAULT_POINTS:
        raise ValueError(f"fault_point({name!r}): not one of {FAULT_POINTS}")
    if os.environ.get(KILL_AT_ENV) in (None, ""):
        return
    check_fault_env()
    if os.environ[KILL_AT_ENV] != name:
        return
    want_step = os.environ.get(KILL_STEP_ENV, "")
    if want_step != "" and step is not None and int(want_step) != step:
        return
    want_rank = os.environ.get(KILL_RANK_ENV, "0")
    if want_rank != "all" and int(want_rank) != rank_world()[0]:
        return
    if os.environ.get(DELAY_ENV):  # said first, so a test knows the phase it interrupts has been reached
        print(f"fft-dist fault point {name}: rank {rank_world()[0]} pauses {os.environ[DELAY_ENV]} s at step {step}",
              file=sys.stderr, flush=True)
        time.sleep(float(os.environ[DELAY_ENV]))
        return
    os.kill(os.getpid(), signal.SIGKILL)
