"""The training progress display: a tqdm bar on a terminal, whole lines now and then in a log file.

A bar redraws itself with carriage returns. In a file (a SLURM log, `... 2>&1 | tee log`) those
become one endless line that the eval and warning lines run into, so when stderr is not a terminal
the same numbers are printed as plain lines instead, every PROGRESS_LINE_S seconds and at the end.
"""
from __future__ import annotations

import sys
import time

PROGRESS_LINE_S = 30.0
"""Seconds between two progress lines in a log file."""


def progress_bar(*, total: int, initial: int, enabled: bool, desc: str):
    """A tqdm bar when stderr is a terminal, else :class:`LineProgress` (the same calls)."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)
    return LineProgress(total=total, initial=initial, enabled=enabled, desc=desc)


class LineProgress:
    """What the bar would show, as one line each time: the first step, then every `every_s`, then the last."""

    def __init__(self, *, total: int, initial: int, enabled: bool, desc: str, every_s: float = PROGRESS_LINE_S):
        self.total, self.n, self.enabled, self.desc, self.every_s = total, initial, enabled, desc, every_s
        self.postfix: dict[str, str] = {}
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._shown_n: int | None = None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._shown_n is None or now - self._last >= self.every_s or self.n >= self.total:
            self._line(now)

    def set_postfix(self, refresh: bool = False, **values: str) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def write(self, message: str) -> None:
        """A line of its own (tqdm.write's place for eval and warning lines)."""
        print(message, flush=True)

    def close(self) -> None:
        if self._shown_n is not None and self._shown_n != self.n:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self._last, self._shown_n = now, self.n
        if not self.enabled:
            return
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: step {self.n}/{self.total}{share} {elapsed:.0f}s {rate:.2f} steps/s{extra}",
              file=sys.stderr, flush=True)
