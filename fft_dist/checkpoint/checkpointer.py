"""A stateful Checkpointer: one run's saves as explicit phases (stage -> write -> commit).

Why a class and why phases: what a run knows about its saves (the last checkpoint, the best one,
the save in flight) lives in one place, and each phase reads only what the one before it left, so
an asynchronous save (issue 21) can stage in the foreground and hand write and commit to a
background runner without reopening the training loop. A synchronous save (the runner is
:func:`run_now`) runs the phases back to back inside :meth:`Checkpointer.save`. An asynchronous one
(``async_save=True``, ``checkpoint.async_save``) stages into a host :class:`StagingBuffer` and hands
write and commit to a :class:`~fft_dist.checkpoint.background.BackgroundWriter`; the next save,
:meth:`Checkpointer.wait` and :meth:`Checkpointer.close` wait for it (at most one save in flight).

- **stage** (local): this rank's fragments checked and laid out, its RNG captured
  (:mod:`fft_dist.checkpoint.stage`).
- **write** (collective): rank 0 makes ``step-N.<run id>.tmp``; every rank writes its shards,
  hashed and fsynced (:mod:`fft_dist.checkpoint.writer`); every rank's problems are agreed.
- **commit** (collective): the fragment entries, file records and RNG states are gathered, the
  index is built on every rank, rank 0 writes the metadata and manifest and renames into
  ``step-N``, then updates ``latest`` and prunes (:mod:`fft_dist.checkpoint.commit`).

The collectives run on a gloo group of the Checkpointer's own (:func:`own_group`), never on the
training group, so a background save can never interleave with training's collectives. Timings
come back as a :class:`SaveResult` per save.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Protocol

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint import ownership
from fft_dist.checkpoint.collective import agree_or_raise
from fft_dist.checkpoint.commit import after_commit, build_index, prepare_temp, write_and_rename
from fft_dist.checkpoint.faults import check_fault_env
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.background import BackgroundWriter
from fft_dist.checkpoint.stage import Staged, StagingBuffer, stage_fragments
from fft_dist.checkpoint.writer import write_shards
from fft_dist.dist import all_gather_small, rank_world


@dataclass(frozen=True)
class SaveTimings:
    """Seconds of one save on this rank, per phase in the order they run."""

    stage: float
    setup: float
    """Rank 0 makes the temporary folder; every rank agrees that it exists."""
    write: float
    """This rank's shards written, hashed and fsynced; every rank's problems agreed."""
    gather: float
    """Every rank's entries, file records and RNG state gathered (waits for the slowest writer)."""
    commit: float
    """Index, metadata, manifest, rename, ``latest`` and pruning."""
    total: float
    blocked: float
    """How long :meth:`Checkpointer.save` held its caller (synchronous: the whole save; asynchronous: the
    stage copy, plus any wait for the save before it). Logged as ``ckpt_block_s``."""
    waited: float = 0.0
    """Of `blocked`, the wait for the previous save still in flight (0 when it was done)."""

    @property
    def written(self) -> float:
        """Write and commit, wherever they ran (logged as ``ckpt_write_s``)."""
        return self.setup + self.write + self.gather + self.commit


@dataclass(frozen=True)
class SaveResult:
    """One committed save."""

    step: int
    path: Path
    timings: SaveTimings


class Pending(Protocol):
    """What a runner returns for the write + commit it was handed (a Future's two methods)."""

    def done(self) -> bool: ...

    def result(self) -> Any: ...


@dataclass
class _Done:
    value: Any

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value


Runner = Callable[[Callable[[], Any]], Pending]


def run_now(job: Callable[[], Any]) -> Pending:
    """The synchronous runner: write and commit run here, in the caller; their errors raise here."""
    return _Done(job())


def own_group(timeout_s: float | None = None):
    """A gloo group over every rank for checkpoint collectives (None with one process). Collective:
    every rank creates it once, in the same order. gloo because a save's collectives move small
    pickled objects between host buffers; on GPUs they then never wait behind NCCL work."""
    if rank_world()[1] == 1:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s) if timeout_s else None)


_OWN = object()


@dataclass
class _Save:
    """One save moving through the phases (rank-local)."""

    step: int
    rank: int
    world: int
    final: Path
    tmp: Path
    train_state: dict
    meta: dict
    protect: set[str]
    backend: str
    t0: float
    staged: Staged | None = None
    problems: list[str] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def head(self) -> str:
        return f"saving {self.final} failed (nothing was committed; {self.tmp.name} removed):"


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"


class Checkpointer:
    """The saves of one run into `root`, owned by `run_id` (collective methods: every rank calls them).

    Keeps :attr:`last` / :attr:`last_step` (the newest checkpoint this object committed) and
    :attr:`best` (the folder of the checkpoint saved at the best evaluation; with `keep_best` it is
    never pruned). `group`: the process group of its collectives; by default one of its own
    (:func:`own_group`), None for the default group (a one-off save: see :func:`save_checkpoint`).
    """

    def __init__(self, root: Path, *, run_id: str, keep_last: int, keep_best: bool = False, group: Any = _OWN,
                 timeout_s: float | None = None, runner: Runner = run_now, async_save: bool = False):
        self.root, self.run_id = Path(root), run_id
        self.keep_last, self.keep_best = keep_last, keep_best
        self.group = own_group(timeout_s) if group is _OWN else group
        self.last: Path | None = None
        self.last_step: int | None = None
        self.best: str | None = None
        self.result: SaveResult | None = None
        """The newest committed save's result."""
        self.newest_step: int | None = None
        """The step of the newest save asked of this Checkpointer (committed, or in flight until :meth:`wait`):
        what "is this step saved already?" must compare with."""
        self._runner = runner
        self._buffer: StagingBuffer | None = None
        self._pending: Pending | None = None
        self._job: _Save | None = None
        self._closed = False
        if async_save:
            self.use_async(True)

    def use_async(self, on: bool) -> None:
        """Switch between synchronous saves and asynchronous ones (staged copy, background writer).
        Rank-local, but every rank must choose the same; never with a save in flight."""
        if self._pending is not None:
            raise RuntimeError("use_async() with a save in flight")
        if on and self._buffer is None:
            self._buffer, self._runner = StagingBuffer(), BackgroundWriter()
        elif not on and self._buffer is not None:
            self._close_writer()
            self._buffer, self._runner = None, run_now

    @property
    def is_async(self) -> bool:
        return self._buffer is not None

    @property
    def staging_bytes(self) -> int:
        """Host memory held by the staging buffer (0 for synchronous saves)."""
        return self._buffer.nbytes if self._buffer is not None else 0

    # -- the public API --------------------------------------------------------------------------------
    def save(self, strategy, step: int, train_state: dict | Callable[[str | None], dict], *, best: bool = False,
             meta: dict | None = None, protect: Collection[str] = ()) -> SaveResult | None:
        """Save `strategy` at `step` as this run's checkpoint ``step-N``. Collective.

        A save still in flight is waited for first (at most one at a time). `best`: this checkpoint
        holds the best-evaluated weights so far. `train_state` may be a function of the best
        checkpoint's folder name, since the saved state records it and this save may be the best.
        `protect`: more folders pruning must keep. Returns the result once committed (always, with
        the synchronous runner), else None and :meth:`wait` returns it.

        Refused on every rank, nothing committed and the temporary folder removed: an existing
        ``step-N`` (never saved over), NaN/inf in any fragment (the error names the tensor and kind),
        fragments that do not tile the tensors, and any write error (the error names the file).
        """
        if self._closed:
            raise RuntimeError("this Checkpointer is closed: it saves nothing more")
        t_wait = time.perf_counter()
        self.wait()
        t0 = time.perf_counter()
        waited = t0 - t_wait
        check_fault_env()
        if best:
            self.best = fmt.step_dir_name(step)
        state = train_state(self.best) if callable(train_state) else train_state
        if self.is_async:  # captured now: training goes on and may change what the caller passed
            state, meta = copy.deepcopy(state), copy.deepcopy(meta)
        rank, world = rank_world()
        name = fmt.step_dir_name(step)
        keep = {self.best} if self.keep_best and self.best else set()
        job = _Save(step=step, rank=rank, world=world, final=self.root / name,
                    tmp=self.root / ownership.temp_name(name, self.run_id), train_state=state, meta=dict(meta or {}),
                    protect=set(protect) | keep, backend=getattr(strategy, "name", "unknown"), t0=t0)
        self.stage(job, strategy)
        self.newest_step = step
        job.seconds["waited"] = waited
        job.seconds["blocked"] = waited + time.perf_counter() - t0  # before the runner: it may finish the job first
        pending = self._runner(lambda: self._write_and_commit(job))  # synchronous: raises a failed save's error
        if not self.is_async:
            job.seconds["blocked"] = waited + time.perf_counter() - t0
        self._pending, self._job = pending, job
        return self.wait() if self._pending.done() else None

    def poll(self) -> SaveResult | None:
        """The save in flight's result if it has committed since the last call (rank-local, never blocks;
        None otherwise). A failed save is left for :meth:`wait` to raise, where every rank calls it."""
        pending = self._pending
        if pending is None or not pending.done():
            return None
        if getattr(pending, "exception", lambda: None)() is not None:
            return None
        return self.wait()

    def wait(self) -> SaveResult | None:
        """Block until the save in flight is committed (raising its error, if it failed); returns the
        newest committed save's result (None before the first). Returns at once when nothing is in flight."""
        pending, job = self._pending, self._job
        self._pending = self._job = None
        if pending is not None:
            pending.result()
            s = job.seconds
            timings = SaveTimings(stage=s["stage"], setup=s["setup"], write=s["write"], gather=s["gather"],
                                  commit=s["commit"], total=s["total"], blocked=s.get("blocked", s["total"]),
                                  waited=s.get("waited", 0.0))
            self.result = SaveResult(step=job.step, path=job.final, timings=timings)
            self.last, self.last_step = job.final, job.step
        return self.result

    def close(self) -> SaveResult | None:
        """Wait for the save in flight, then refuse further saves (the background writer ends). Idempotent."""
        try:
            return self.wait()
        finally:
            self._closed = True
            self._close_writer()

    def _close_writer(self) -> None:
        if isinstance(self._runner, BackgroundWriter):
            self._runner.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the phases ------------------------------------------------------------------------------------
    def stage(self, job: _Save, strategy) -> None:
        """This rank's fragments and RNG state, as the write needs them. Local: a problem is kept for
        the write phase's agreement, so that every rank raises together."""
        t = time.perf_counter()
        try:
            job.staged = stage_fragments(strategy, rank=job.rank, world=job.world, step=job.step, into=self._buffer)
        except Exception as e:  # noqa: BLE001 - reported on every rank in the write phase
            job.problems.append(f"rank {job.rank}: {_describe(e)}")
        job.seconds["stage"] = time.perf_counter() - t

    def write(self, job: _Save) -> None:
        """Rank 0 makes the temporary folder; every rank writes its shards into it. Collective."""
        t = time.perf_counter()
        setup = prepare_temp(self.root, job.final, job.tmp, self.run_id) if job.rank == 0 else []
        agree_or_raise(setup, job.head, self.group)
        t_setup = time.perf_counter()
        if not job.problems:
            try:
                job.files = write_shards(job.staged, job.tmp)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                job.problems.append(f"rank {job.rank}: {_describe(e)}")
        agree_or_raise(job.problems, job.head, self.group)
        job.seconds.update(setup=t_setup - t, write=time.perf_counter() - t_setup)

    def commit(self, job: _Save) -> None:
        """Gather every rank's entries; rank 0 writes the metadata, renames into ``step-N``, points
        ``latest`` at it and prunes. Collective."""
        t = time.perf_counter()
        mine = {"rank": job.rank, "rng": job.staged.rng, "entries": job.staged.entries, "files": job.files}
        gathered = all_gather_small(mine, group=self.group)
        t_gather = time.perf_counter()
        # every rank builds the same index, so a bad tiling raises everywhere at once
        index = build_index([g["entries"] for g in gathered], job.world)
        problems = []
        if job.rank == 0:
            try:
                write_and_rename(tmp=job.tmp, final=job.final, ckpt_root=self.root, step=job.step, world=job.world,
                                 index=index, gathered=gathered, train_state=job.train_state, meta=job.meta,
                                 backend=job.backend, run_id=self.run_id)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                problems.append(_describe(e))
        agree_or_raise(problems, job.head, self.group)
        if job.rank == 0:
            after_commit(self.root, job.final, step=job.step, keep_last=self.keep_last, protect=job.protect,
                         run_id=self.run_id)
        end = time.perf_counter()
        job.seconds.update(gather=t_gather - t, commit=end - t_gather, total=end - job.t0)
        if job.rank == 0 and os.environ.get("FFT_DIST_CKPT_VERBOSE"):
            print(f"fft-dist: saved {job.final} in {end - job.t0:.2f} s", flush=True)

    def _write_and_commit(self, job: _Save) -> _Save:
        """What the runner runs. A failure removes the temporary folder: every error above is agreed by
        all ranks first, so no rank is still writing into it."""
        try:
            self.write(job)
            self.commit(job)
        except BaseException:
            if job.rank == 0 and job.tmp.is_dir():
                ownership.remove(job.tmp, ownership.Reason.OWN_TEMPORARY, owner=self.run_id)
            raise
        return job


def save_checkpoint(strategy, *, ckpt_root: Path, step: int, train_state: dict, keep_last: int, run_id: str,
                    meta: dict | None = None, protect: Collection[str] = ()) -> Path:
    """A one-off synchronous save on the default process group (scripts, tests, tools); a run uses
    one :class:`Checkpointer` for all its saves. Collective. See :meth:`Checkpointer.save`."""
    saver = Checkpointer(ckpt_root, run_id=run_id, keep_last=keep_last, group=None)
    return saver.save(strategy, step, train_state, meta=meta, protect=protect).path
