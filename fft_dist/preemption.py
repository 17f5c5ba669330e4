"""Pre-emption: a stop signal means "finish this step, checkpoint, exit 75", wherever it lands.

SIGTERM, SIGUSR1 (SLURM's ``--signal``), SIGINT (Ctrl-C) and SIGHUP are treated alike, whether
they reach the launcher, the whole process group or a single rank:

- a rank (:class:`StopSignal`) only raises a flag; the trainer all-reduces it after every step,
  so one signalled rank stops the whole job at the same step, which is then checkpointed;
- the launcher (:class:`SignalForwarder`) passes the signal on to its ranks and keeps waiting
  for them, so their exit code (75: a checkpoint was written) is what the user gets. torchrun's
  own handling would kill the ranks after a grace period and lose that code;
- ranks started by a launcher die with it (:func:`die_with_parent`): after ``kill -9`` of the
  launcher no rank trains or writes a checkpoint unsupervised. The launcher names itself in
  :data:`SUPERVISOR_ENV` (host, pid and start time: a bare pid can be reused); each rank arms
  Linux's parent-death signal, then checks that its supervisor still runs, and a watchdog thread
  keeps checking, so the rank stops whatever sits between them (DeepSpeed's runner and per-node
  launch process) and even if the launcher died before the rank could arm anything. Across nodes
  the supervisor is the node's own agent (``fft-dist node``), never a process of another host.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from fft_dist.processes import alive, start_time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
RANK_MODULE = "fft_dist.train"  # what every launcher starts per rank (``python -m fft_dist.train``)
SUPERVISOR_ENV = "FFT_DIST_SUPERVISOR"
"""``host:pid:start time`` of the fft-dist process that started this node's ranks (set by the launcher
or the node agent); each rank stops when that process is gone."""
WATCH_INTERVAL_S = 1.0
PARENT_AT_START = os.getppid()
"""The parent when this module was first imported (the rank's first import): if the launcher dies
before the rank arms its death signal, the rank's parent has changed by then."""


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


class StartupInterrupted(BaseException):
    """A stop signal reached the launcher before any rank existed: nothing ran, nothing to save.

    A BaseException, like KeyboardInterrupt: libraries that catch Exception and re-raise it as
    ``type(e)(message)`` (OmegaConf does, while composing) must let it through untouched.
    """

    def __init__(self, signum: int | str):
        self.signum = signum if isinstance(signum, int) else getattr(signal.Signals, str(signum).split()[0],
                                                                     signal.SIGTERM)
        super().__init__(signal_name(self.signum))


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


def become_supervisor() -> None:
    """Name this process as the supervisor of the ranks it is about to start (they inherit the env)."""
    os.environ[SUPERVISOR_ENV] = f"{socket.gethostname()}:{os.getpid()}:{start_time(os.getpid())}"


def supervisor() -> tuple[int, int] | None:
    """(pid, start time) of this rank's supervisor on this host; None when there is none to watch
    (a user's own launcher, or a supervisor on another host: there the node's agent is the one)."""
    parts = os.environ.get(SUPERVISOR_ENV, "").rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return int(parts[1]), int(parts[2])


def set_parent_death_signal() -> bool:
    """PR_SET_PDEATHSIG(SIGKILL): Linux kills this process when its parent dies. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _orphaned(why: str) -> None:
    """Stop now, as the parent-death signal would: no checkpoint that nobody supervises."""
    try:
        print(f"fft-dist: rank {os.environ.get('RANK', '?')}: {why}; stopping without training or saving",
              file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # the launcher held the other end of stderr
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(pid: int, started: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if not alive(pid, started):
            _orphaned(f"its launcher (pid {pid}) is gone")


def die_with_parent() -> None:
    """Stop this rank when its launcher dies, whatever sits between them. Called first thing by a rank.

    SIGKILL, not a stop signal: a rank whose launcher is gone must not start a checkpoint that
    nobody supervises. Three guards: the parent-death signal (armed now, against the parent we
    have now); a check that the parent is still the one this process started with and that the
    supervisor (:data:`SUPERVISOR_ENV`) still runs, which catches a launcher that died before
    the signal was armed; and a watchdog thread that keeps checking the supervisor.
    """
    set_parent_death_signal()
    if os.getppid() != PARENT_AT_START:
        _orphaned(f"its parent (pid {PARENT_AT_START}) died before the rank could watch it")
    watched = supervisor()
    if watched is None:
        return
    if not alive(*watched):
        _orphaned(f"its launcher (pid {watched[0]}) is gone")
    threading.Thread(target=_watch, args=watched, name="fft-dist-supervisor-watch", daemon=True).start()
