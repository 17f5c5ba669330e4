"""One run's checkpoints: who owns them, where a resume starts, each save, and what gets exported.

The trainer calls this, never the checkpoint functions directly, so the rules of a run's
checkpoints live in one place: the run id that marks what this run may prune or replace (from
run.dir, :mod:`fft_dist.rundir`), the checkpoint to resume from (verified on every rank, falling
back past corrupt ones), newer damaged folders set aside so no save lands on them, and the run's
:class:`~fft_dist.checkpoint.Checkpointer`, which makes every save with the run id, the keep_last /
keep_best rules and the metadata the export needs, and knows the run's last and best checkpoints.
It also decides ``checkpoint.async_save`` (:meth:`RunCheckpoints.choose_async`) and reports each
committed save's timings as ``ckpt_block_s`` / ``ckpt_write_s``, with the warnings they call for.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Callable, Collection

from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint.collective import agree_or_raise
from fft_dist.checkpoint import ownership
from fft_dist.checkpoint.format import TRAIN_STATE_FILE
from fft_dist.checkpoint.layout import SHARED_FS_HELP, read_shared_probe, write_shared_probe
from fft_dist.checkpoint.ownership import Reason
from fft_dist.checkpoint.stage import projected_staging_bytes
from fft_dist.config import AsyncSave, ExportChoice, FFTConfig
from fft_dist.dist import DistContext, all_gather_small, broadcast_small, print0
from fft_dist.rundir import run_identity
from fft_dist.train_state import parse_trainer_state


def read_generation_config(model_path: str | None) -> dict | None:
    """The model folder's generation_config.json, stored in each checkpoint so that an export carries
    it without reading any folder a checkpoint names."""
    if model_path is None:
        return None
    try:
        obj = json.loads((Path(model_path) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


AUTO_ASYNC_SHARE = 0.5
"""checkpoint.async_save=auto: the staging buffers of a host's ranks may take at most this share of the
memory it has available (MemAvailable) when the run starts; the rest stays for data, the page cache and
whatever grows later."""


def mem_available() -> int | None:
    """This host's available memory in bytes (Linux's MemAvailable), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def decide_async(mode: AsyncSave, hosts: list[tuple[str, int, int | None]]) -> tuple[bool, str]:
    """(async or not, why) from every rank's (host, staging bytes, host's available bytes)."""
    if mode != AsyncSave.auto:
        return mode == AsyncSave.on, f"checkpoint.async_save={mode.value}"
    need: dict[str, int] = {}
    for host, nbytes, _ in hosts:
        need[host] = need.get(host, 0) + nbytes
    gib = 1 << 30

    def size(n: int) -> str:
        return f"{n / gib:.2f} GiB" if n >= gib else f"{n / (1 << 20):.1f} MiB"

    for host, _, avail in hosts:
        if avail is None:
            return False, f"the available memory of {host} is unknown"
        if need[host] > AUTO_ASYNC_SHARE * avail:
            return False, (f"the staging buffers of {host}'s ranks ({size(need[host])}) exceed "
                           f"{AUTO_ASYNC_SHARE:.0%} of its {avail / gib:.1f} GiB available")
    host, _, avail = max(hosts, key=lambda h: need[h[0]])
    return True, (f"the staging buffers of {host}'s ranks ({size(need[host])}) fit in "
                  f"{AUTO_ASYNC_SHARE:.0%} of its {avail / gib:.1f} GiB available")


def save_warnings(t: ckpt.SaveTimings, *, step: int, signal_lead_s: int,
                  every_steps: int) -> list[tuple[str, str]]:
    """(kind, message) for each way a committed save is too slow for the run's settings: a stop signal during
    a save costs two saves (that one, then the current step's), so twice a save must fit in the launcher's
    signal lead; and a save still being written when the next was due made training wait."""
    warnings = []
    save_s = t.blocked + t.written
    if signal_lead_s and 2 * save_s > signal_lead_s:
        warnings.append(("lead", f"fft-dist: warning: a save takes {save_s:.0f} s; a stop signal during a save costs "
                                 f"two (that one, then the current step's), {2 * save_s:.0f} s, more than "
                                 f"launcher.signal_lead_s={signal_lead_s}: raise it, or the job may be killed "
                                 f"before its checkpoint is committed"))
    if t.waited > 0.05:
        warnings.append(("every", f"fft-dist: warning: the save of step {step} was still being written when the "
                                  f"next one was due (training waited {t.waited:.1f} s); raise "
                                  f"checkpoint.every_steps={every_steps}"))
    return warnings


class RunCheckpoints:
    """The checkpoints of one run (collective methods are called by every rank)."""

    def __init__(self, cfg: FFTConfig, ctx: DistContext, *, log: Callable[[dict], None] = lambda record: None,
                 say: Callable[[str], None] = print0):
        self.cfg, self.ctx = cfg, ctx
        self._log, self._say = log, say
        self._warned: set[str] = set()
        self._reported: int | None = None
        self.root = Path(cfg.checkpoint.dir)
        self.run_id: str = broadcast_small(run_identity(Path(cfg.run.dir)) if ctx.is_main else None)
        self.generation_config = read_generation_config(cfg.model.path)
        self.saver = ckpt.Checkpointer(self.root, run_id=self.run_id, keep_last=cfg.checkpoint.keep_last,
                                       keep_best=cfg.checkpoint.keep_best, timeout_s=ctx.timeout_s)
        """The run's saves (its own process group, made here, by every rank at once)."""

    def check_writable(self) -> None:
        """A read-only or full checkpoint disk (or a folder named ``latest``) shows now, on every rank
        at once, not after training. Collective."""
        problems = []
        try:
            ckpt.check_writable(self.root)
        except ckpt.CheckpointError as e:
            problems.append(str(e))
        agree_or_raise(problems, "checkpoints could not be saved (nothing was trained):")
        self.check_shared()

    def check_shared(self) -> None:
        """Every rank sees the folder rank 0 writes into (node-local disks fail here, not at the first save,
        hours in): rank 0 writes a token under a unique name, every rank opens that name. Collective."""
        if self.ctx.world_size == 1:
            return
        probe = None
        if self.ctx.is_main:
            try:
                probe = (*write_shared_probe(self.root, owner=self.run_id), socket.gethostname())
            except OSError as e:
                probe = f"rank 0 cannot write a probe into {self.root}: {e.strerror or e}"
        probe = broadcast_small(probe)
        problems = [probe] if isinstance(probe, str) else []
        if not problems and not self.ctx.is_main:
            problem = read_shared_probe(self.root, probe[0], probe[1], writer_host=probe[2])
            problems = [problem] if problem else []
        try:
            agree_or_raise(problems, f"checkpoint.dir {self.root} is not one folder that every rank shares (nothing "
                                     f"was trained): {SHARED_FS_HELP}.")
        finally:
            if self.ctx.is_main and not isinstance(probe, str):
                ownership.remove(self.root / probe[0], Reason.OWN_TEMPORARY, owner=self.run_id)

    def choose_resume(self) -> tuple[Path, dict] | None:
        """(the checkpoint to resume from, its train_state.json) or None for a fresh start. Collective.

        The trainer's sections of its train state are checked against their spec first. The checkpoint is
        hashed on every rank (a corrupt newest one falls back to the next older intact one); newer damaged
        folders of this run are then set aside so that no save lands on them, and anything else newer stops
        the run here, before training.
        """
        if self.cfg.resume_request.fresh:
            return None
        path, corrupt = ckpt.choose_verified(self.cfg.resume, self.root)
        if path is None:
            return None
        envelope = ckpt.read_train_state(path)
        parse_trainer_state(envelope["train_state"], str(path / TRAIN_STATE_FILE))  # before anything uses it
        problems = []
        if self.ctx.is_main:
            try:
                problems = ckpt.clear_the_way(self.root, resume_step=int(envelope["step"]), run_id=self.run_id,
                                              corrupt=corrupt)
            except (OSError, ckpt.CheckpointError) as e:
                problems = [f"cannot move a damaged checkpoint out of the way: {e}"]
        agree_or_raise(problems, f"cannot resume from {path}:")
        self.saver.best = envelope["train_state"]["trainer"]["best_checkpoint"]  # kept out of pruning again
        return path, envelope

    def choose_async(self, strategy, *, frozen: Collection[str] = ()) -> None:
        """Decide checkpoint.async_save on every rank alike, before training, and say why (rank 0, under
        the banner). Collective. ``auto`` counts each rank's staging buffer as it will be once the
        optimizer has its states (the formula of `estimate`'s ``stage``, with the rank's real share;
        `frozen` parameters get no states) against its host's available memory."""
        mode = self.cfg.checkpoint.async_save
        nbytes = (projected_staging_bytes(strategy, state_bytes_per_param=self.cfg.optimizer.state_bytes_per_param(),
                                          frozen=frozen) if mode == AsyncSave.auto else 0)
        mine = (socket.gethostname(), nbytes, mem_available())
        hosts = all_gather_small(mine) if mode == AsyncSave.auto else [mine]
        on, why = decide_async(mode, hosts)
        self.saver.use_async(on)
        how = ("asynchronous (a host staging buffer per rank, a background writer)" if on
               else "synchronous (training waits for each save)")
        self._say(f"fft-dist: checkpoints are {how}: {why}")

    def _report(self, result: ckpt.SaveResult | None, step: int) -> None:
        """Log a committed save's timings; warn (once each) when saves are too slow for the run's settings."""
        if result is None or result.step == self._reported:
            return
        self._reported = result.step
        t = result.timings
        self._log({"step": step, "event": "checkpoint", "checkpoint_step": result.step,
                   "ckpt_block_s": t.blocked, "ckpt_write_s": t.written})
        lead = getattr(self.cfg.launcher, "signal_lead_s", 0)  # a launcher without a lead sends no early signal
        for key, message in save_warnings(t, step=result.step, signal_lead_s=lead,
                                          every_steps=self.cfg.checkpoint.every_steps):
            if key not in self._warned:
                self._warned.add(key)
                self._say(message)

    def poll(self, step: int) -> None:
        """Log the save in flight if it has committed (rank-local, never blocks)."""
        self._report(self.saver.poll(), step)

    def load(self, strategy, path: Path) -> dict:
        """Load `path` (already verified by :meth:`choose_resume`: no second pass over the data)."""
        return ckpt.load_checkpoint(strategy, path, verify=False,
                                    params_only=not self.cfg.checkpoint.load_optimizer)

    def save(self, strategy, step: int, *, train_state, meta: dict, best: bool) -> ckpt.SaveResult | None:
        """Save `step` as this run's; `best`: it holds the best-evaluated weights so far (kept with keep_best,
        exported with export=best). `train_state`: see :meth:`Checkpointer.save`. Collective."""
        previous = self.saver.last_step
        result = self.saver.save(strategy, step, train_state, best=best,
                                 meta={**meta, "generation_config": self.generation_config})
        if self.saver.result is not None and self.saver.last_step != previous:  # the save before, or this one
            self._report(self.saver.result, step)
        return result

    @property
    def last(self) -> Path | None:
        """The newest checkpoint this run committed (None before its first save)."""
        return self.saver.last

    @property
    def saved_step(self) -> int | None:
        """The step of this run's newest save (committed, or in flight)."""
        return self.saver.newest_step

    def close(self, step: int) -> None:
        """Wait for a save in flight (the end of training, a stop, the export wait for it); no save after
        this. Collective."""
        self._report(self.saver.close(), step)

    def abandon(self) -> None:
        """Training failed: wait for the save in flight before the rank leaves (and releases the run's locks),
        keeping training's error (the save's own, if it failed too, is said on rank 0)."""
        try:
            self.saver.close()
        except Exception as e:  # noqa: BLE001 - training's error is the one reported
            print0(f"fft-dist: the save in flight failed too: {e}")

    def export_source(self) -> Path:
        """The checkpoint ``checkpoint.export_final`` writes: the last one, or the best-eval one."""
        best = self.saver.best
        if self.cfg.checkpoint.export != ExportChoice.best or best is None:
            if self.cfg.checkpoint.export == ExportChoice.best:
                print0("fft-dist: warning: no saved checkpoint was taken at an evaluation; exporting the last one")
            return self.saver.last
        return self.root / best
