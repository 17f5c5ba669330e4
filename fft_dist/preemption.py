"""Pre-emption: a stop signal means "finish this step, checkpoint, exit 75", wherever it lands.

SIGTERM, SIGUSR1 (SLURM's ``--signal``), SIGINT (Ctrl-C) and SIGHUP are treated alike, whether
they reach the launcher, the whole process group or a single rank:

- a rank (:class:`StopSignal`) only raises a flag; the trainer all-reduces it after every step,
  so one signalled rank stops the whole job at the same step, which is then checkpointed;
- the launcher (:class:`SignalForwarder`) passes the signal on to its ranks and keeps waiting
  for them, so their exit code (75: a checkpoint was written) is what the user gets. torchrun's
  own handling would kill the ranks after a grace period and lose that code;
- ranks started by a launcher die with it (:func:`die_with_parent`): after ``kill -9`` of the
  launcher no rank trains or writes a checkpoint unsupervised.
"""
from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
RANK_MODULE = "fft_dist.train"  # what every launcher starts per rank (``python -m fft_dist.train``)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "none"


class StopSignal:
    """Worker side: remembers the first stop signal; the loop checks :attr:`received` after each step."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received = signum


class StartupInterrupted(Exception):
    """A stop signal reached the launcher before any rank existed: nothing ran, nothing to save."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class SignalForwarder:
    """Launcher side: forward stop signals to the ranks and keep waiting.

    The ranks are our direct children under torchrun's agent; :meth:`forward_to_ranks_below`
    switches to the rank processes further down (the deepspeed launcher's runner and its per-node
    process sit in between and would kill the ranks without a checkpoint if signalled).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.find_targets = lambda: child_pids(os.getpid())
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def forward_to_ranks_below(self) -> None:
        self.find_targets = lambda: rank_pids(os.getpid())

    def _handle(self, signum: int, _frame) -> None:
        first = self.received is None
        if first:
            self.received = signum
        children = self.find_targets()
        if not children:
            if first:
                raise StartupInterrupted(signum)  # unwinds torch's launch; nothing trained yet
            return
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if first:
            print(f"fft-dist: received {signal_name(signum)}; the ranks finish the current step, "
                  "save a checkpoint and stop", file=sys.stderr, flush=True)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc); the ranks torchrun's agent started for us."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def rank_pids(root: int) -> list[int]:
    """Descendants of `root` running the worker module (``-m fft_dist.train``), searched depth-first."""
    out: list[int] = []
    todo = child_pids(root)
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
        except OSError:
            continue
        if any(a == b"-m" and b == RANK_MODULE.encode() for a, b in zip(words, words[1:])):  # not `--module X`
            out.append(pid)
        else:
            todo += child_pids(pid)
    return out


def ignore_forwarded_signals() -> None:
    """For a launcher process between us and the ranks (DeepSpeed's runner): SIGUSR1/SIGHUP, which
    SLURM sends to every process of a job step, must reach only the ranks; the ranks set their own
    handlers, so the inherited "ignore" does not reach them."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the launcher) dies (PR_SET_PDEATHSIG).

    SIGKILL, not a stop signal: a rank whose launcher is gone must not start a checkpoint that
    nobody supervises. A no-op where prctl is unavailable.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)
