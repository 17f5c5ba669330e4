"""The background writer of asynchronous saves: one low-priority daemon thread per rank.

Why a thread, not a process: the writer reads the staging buffer where the stage phase left it,
with nothing pickled and no shared-memory segment to create, name or clean up; and a daemon
thread dies with its rank (a rank ends with ``os._exit``, and ``kill -9`` takes the whole process),
so it can never write on after its rank, nor outlive the run's locks, which the rank releases
only after the save in flight was waited for. The GIL is not a bottleneck: the writer spends its
time in hashlib and in ``write()``/``fsync()``, which release the GIL for each of their 64 MB
slices (:mod:`fft_dist.checkpoint.safetensors_io`), and in gloo collectives, which wait in C++. It
hashes in its own thread rather than on the sha256 helper a synchronous save uses, which runs at the
rank's priority.

Why SCHED_IDLE: on Linux each thread has its own scheduling policy, so the writer puts itself under
SCHED_IDLE when it starts (or, where that is refused, raises its nice value by
:data:`NICE_INCREMENT`): it gets a core only when no training thread wants one, and a training thread
that wakes (a collective's reply, a kernel's end) preempts it at once. Measured in
``bench/checkpoint.py --train`` (52M parameters, fsdp on 2 ranks, 2 cores): steps during a write ran
1.48x a step without one at nice +10 (likely because a waking thread may wait out the writer's slice,
and a step has dozens of wake-ups; not profiled), 1.17x under SCHED_IDLE. The write simply takes longer when the cores are busy.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from fft_dist.checkpoint.safetensors_io import hash_in_this_thread

NICE_INCREMENT = 10


def lower_own_priority(increment: int = NICE_INCREMENT) -> bool:
    """Run the calling thread under SCHED_IDLE where Linux allows it (it gets a core only when no other
    thread wants one, and any waking thread preempts it at once), else raise its nice value (Linux: per
    thread); False where neither is possible."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (AttributeError, OSError):
        pass
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + increment))
        return True
    except (AttributeError, OSError):
        return False


class BackgroundWriter:
    """A runner for :class:`~fft_dist.checkpoint.Checkpointer`: each job runs, in order, on one
    daemon thread; calling it returns the job's Future at once."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="fft-dist-checkpoint-writer", daemon=True)
        self._thread.start()

    def __call__(self, job: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def _loop(self) -> None:
        lower_own_priority()
        hash_in_this_thread()  # the sha256 helper thread would hash at the rank's priority
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the save
                future.set_exception(e)

    def close(self) -> None:
        """Let the thread end after the jobs already handed to it."""
        self._jobs.put(None)
