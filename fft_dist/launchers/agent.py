"""Processes that start ranks, supervised by this one: torchrun's agent in this process, or
DeepSpeed's runner as a child; stop signals go to the ranks, and the job's exit code is the first
failed rank's."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from fft_dist import exit_codes
from fft_dist.launchers.base import STOPPED_ENV
from fft_dist.preemption import (RANK_MODULE, SignalForwarder, StartupInterrupted, ignore_forwarded_signals,
                                 set_parent_death_signal, signal_name)

AGENT_FLAGS = ["--monitor_interval=0.5", "--signals_to_handle=SIGQUIT"]
"""fft-dist's own torchrun settings: our SignalForwarder handles the stop signals (torchrun's handler
would kill ranks mid-save), and a short monitor interval notices a dead rank quickly."""
SLURM_PORT = 29500
"""The rendezvous port when the first node is another machine and launcher.master_port=0 (slurm, deepspeed hosts)."""
DEEPSPEED_RUNNER = [sys.executable, "-m", "deepspeed.launcher.runner"]  # the `deepspeed` command, no PATH lookup


class StopForwarder(SignalForwarder):
    """Also tells ranks that torchrun restarts after a stop signal to stop at once (they inherit our env)."""

    def _handle(self, signum: int, frame) -> None:
        os.environ.setdefault(STOPPED_ENV, signal_name(signum))
        super()._handle(signum, frame)


def threads_per_rank(local_ranks: int) -> int:
    """OMP_NUM_THREADS for each of `local_ranks` ranks: the CPUs this process may run on (its affinity:
    what SLURM or a container gave the task, not the whole machine) shared out, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_ranks))


def run_deepspeed(argv: list[str], env: dict[str, str], forwarder: SignalForwarder, *, ranks_here: bool = True) -> int:
    """DeepSpeed's runner as a child; its exit code (the first failed rank's, e.g. 75) is the job's.

    With the ranks on this machine, stop signals go to the ranks only: the runner and its launch
    process would kill them without a checkpoint. So the runner gets its own session (a Ctrl-C to
    the terminal's process group misses it) and ignores SIGUSR1/SIGHUP, which SLURM sends to every
    process of a job step. On other hosts (ssh) the signal can only go to the runner.
    """
    if ranks_here:
        forwarder.forward_to_ranks_below()

    def child_setup() -> None:  # the runner dies with us, so it cannot outlive its supervisor
        set_parent_death_signal()
        if ranks_here:
            ignore_forwarded_signals()

    proc = subprocess.Popen(argv, env=env, start_new_session=ranks_here, preexec_fn=child_setup)
    try:
        code = proc.wait()
    except StartupInterrupted:  # no rank yet: stop the runner and what it started
        if ranks_here:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait()
        raise
    return 128 - code if code < 0 else code


def start_agent(torchrun_argv: list[str], forwarder: SignalForwarder) -> int:
    """Run torchrun's agent in this process (ranks read :data:`CONFIG_ENV`); return the job's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([*torchrun_argv, "-m", RANK_MODULE])
    nproc = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    # Our forwarder handles the stop signals; torchrun's handler would kill the ranks mid-save.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        return job_exit_code(e.failures, forwarder)
    return exit_codes.OK


def job_exit_code(failures: dict, forwarder: SignalForwarder) -> int:
    """The exit code of the rank that failed first (the others were stopped because of it)."""
    first = min(failures.values(), key=lambda f: f.timestamp)
    code = first.exitcode
    if code in exit_codes.DOCUMENTED:
        return code
    if code < 0:
        print(f"fft-dist: rank {first.local_rank} was killed by {signal_name(-code)}"
              f"{' (after ' + signal_name(forwarder.received) + ')' if forwarder.received else ''}",
              file=sys.stderr, flush=True)
        return 128 - code
    print(f"fft-dist: rank {first.local_rank} failed with exit code {code}; see its messages above",
          file=sys.stderr, flush=True)
    return code


