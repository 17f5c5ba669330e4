"""Collective error handling: gather every rank's problems, raise the same CheckpointError everywhere.

A rank that raises alone leaves the others waiting in the next collective until the timeout.
So every check that may fail on one rank only (a checksum, a shard write, a disk error) ends
with :func:`agree_or_raise`: all ranks see the union of all problems, in rank order, and
either all raise the same error or all go on.
"""
from __future__ import annotations

from fft_dist.checkpoint.format import CheckpointError
from fft_dist.dist import all_gather_small

MAX_SHOWN = 40


def agree(problems: list[str], group=None) -> list[str]:
    """Union of every rank's problems (deduplicated, in rank order). Collective on `group` (None: the
    default group; a save passes its own, see :mod:`fft_dist.checkpoint.checkpointer`)."""
    out: list[str] = []
    for ps in all_gather_small(list(problems), group=group):
        for p in ps:
            if p not in out:
                out.append(p)
    return out


def raise_problems(problems: list[str], head: str) -> None:
    """Raise one CheckpointError listing `problems` under `head` (nothing when the list is empty). Local."""
    if problems:
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise CheckpointError(head + "\n  " + "\n  ".join(problems[:MAX_SHOWN]) + more)


def agree_or_raise(problems: list[str], head: str, group=None) -> None:
    """:func:`agree`, then :func:`raise_problems`: every rank raises the same error, or none does."""
    raise_problems(agree(problems, group), head)
