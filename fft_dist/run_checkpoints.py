"""One run's checkpoints: who owns them, where a resume starts, each save, and what gets exported.

The trainer calls this, never the checkpoint functions directly, so the rules of a run's
checkpoints live in one place: the run id that marks what this run may prune or replace (from
run.dir, :mod:`fft_dist.rundir`), the checkpoint to resume from (verified on every rank, falling
back past corrupt ones), newer damaged folders set aside so no save lands on them, and the run's
:class:`~fft_dist.checkpoint.Checkpointer`, which makes every save with the run id, the keep_last /
keep_best rules and the metadata the export needs, and knows the run's last and best checkpoints.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint.collective import agree_or_raise
from fft_dist.checkpoint import ownership
from fft_dist.checkpoint.format import TRAIN_STATE_FILE
from fft_dist.checkpoint.layout import SHARED_FS_HELP, read_shared_probe, write_shared_probe
from fft_dist.checkpoint.ownership import Reason
from fft_dist.config import ExportChoice, FFTConfig
from fft_dist.dist import DistContext, broadcast_small, print0
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


class RunCheckpoints:
    """The checkpoints of one run (collective methods are called by every rank)."""

    def __init__(self, cfg: FFTConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
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

        The trainer's sections of its train state are checked against their spec first. The checkpoint is hashed on every rank (a corrupt newest one falls back to the next older
        intact one); newer damaged folders of this run are then set aside so that no save lands on
        them, and anything else newer stops the run here, before training.
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

    def load(self, strategy, path: Path) -> dict:
        """Load `path` (already verified by :meth:`choose_resume`: no second pass over the data)."""
        return ckpt.load_checkpoint(strategy, path, verify=False,
                                    params_only=not self.cfg.checkpoint.load_optimizer)

    def save(self, strategy, step: int, *, train_state, meta: dict, best: bool) -> ckpt.SaveResult | None:
        """Save `step` as this run's; `best`: it holds the best-evaluated weights so far (kept with keep_best,
        exported with export=best). `train_state`: see :meth:`Checkpointer.save`. Collective."""
        return self.saver.save(strategy, step, train_state, best=best,
                               meta={**meta, "generation_config": self.generation_config})

    @property
    def last(self) -> Path | None:
        """The newest checkpoint this run committed (None before its first save)."""
        return self.saver.last

    @property
    def saved_step(self) -> int | None:
        """The step of this run's newest save (committed, or in flight)."""
        return self.saver.newest_step

    def close(self) -> None:
        """Wait for a save in flight; no save after this. Collective."""
        self.saver.close()

    def export_source(self) -> Path:
        """The checkpoint ``checkpoint.export_final`` writes: the last one, or the best-eval one."""
        best = self.saver.best
        if self.cfg.checkpoint.export != ExportChoice.best or best is None:
            if self.cfg.checkpoint.export == ExportChoice.best:
                print0("fft-dist: warning: no saved checkpoint was taken at an evaluation; exporting the last one")
            return self.saver.last
        return self.root / best
