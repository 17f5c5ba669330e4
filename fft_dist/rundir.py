"""The run directory: one job at a time, a run id that proves what this run made, and never on top
of what another run left (its checkpoints, its config.yaml, metrics.jsonl, tb/ events or hf/ export).

Called once per job, before training: by the launcher for ``fft-dist launch``/``train``, by the
node agent of a SLURM job's first node, or by rank 0 when a user's own torchrun / deepspeed
launcher starts the ranks. The run id lives in ``run.dir/.fft-dist-run.json``; a resumed run keeps
it, a fresh run gets a new one. See :mod:`fft_dist.checkpoint.ownership` for how it is used.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fft_dist import locks
from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint import ownership
from fft_dist.checkpoint.ownership import Reason
from fft_dist.config import ConfigError, FFTConfig
from fft_dist.errors import CheckpointError

LOCK_FILE = locks.LOCK_FILE
RUN_MARKER = ".fft-dist-run.json"
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl")
"""Files every run writes into run.dir (besides tb/ events and the hf/ export)."""
TB_EVENTS = "events.out.tfevents."


class RunDirBusy(ConfigError):
    """Another live process holds the run directory or the checkpoint directory."""


def make_dir_like_parent(folder: Path) -> None:
    """mkdir -p, each new folder owned like its parent when we are root: a launcher run as root (e.g.
    beside a container engine) must not leave the run's ranks, which may run as the folder owner's
    uid (the image's user), a checkpoint folder they cannot write."""
    folder = Path(folder)
    if folder.is_dir():
        return
    make_dir_like_parent(folder.parent)
    folder.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        parent = folder.parent.stat()
        if (parent.st_uid, parent.st_gid) != (0, 0):
            os.chown(folder, parent.st_uid, parent.st_gid)


def lock_dir(folder: Path, what: str) -> None:
    """Take an exclusive lock on `folder` (run.dir or checkpoint.dir), recording who holds it; refuse if
    another job has it (:mod:`fft_dist.locks`: flock, or a lease file where the file system has no
    flock). Taking a lock this process already holds is a no-op."""
    folder = Path(folder).resolve()
    if locks.holds(folder):
        return
    try:
        make_dir_like_parent(folder)
        locks.acquire(folder, what)
    except locks.Held as e:
        raise RunDirBusy(f"{what}={folder} is in use by another fft-dist run ({e}); wait for it, stop it, "
                         f"or pick another {what}") from None
    except OSError as e:  # a read-only checkpoint disk is a checkpoint error (exit 4), as at a save
        error = CheckpointError if what == "checkpoint.dir" else ConfigError
        raise error(f"{what}={folder} is not writable: {e.strerror or e}; pick another {what}") from None


def release_locks() -> None:
    """Give up this process's locks (a SLURM submitter, whose job's first node takes them over)."""
    locks.release_all()


def lock_run(cfg: FFTConfig) -> None:
    """Lock run.dir and checkpoint.dir (two runs with different run.dirs may share a checkpoint.dir)."""
    lock_dir(Path(cfg.run.dir), "run.dir")
    lock_dir(Path(cfg.checkpoint.dir), "checkpoint.dir")


def read_run_id(run_dir: Path) -> str | None:
    """The run id recorded in run.dir (None: no run has claimed it, or the marker is unreadable)."""
    path = Path(run_dir) / RUN_MARKER
    try:
        run_id = json.loads(path.read_text(encoding="utf-8")).get("run_id")
        return ownership.check_run_id(run_id)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def write_run_id(run_dir: Path, run_id: str) -> None:
    path = Path(run_dir) / RUN_MARKER
    tmp = path.with_name(ownership.temp_name(RUN_MARKER, run_id))
    tmp.write_text(json.dumps({"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def run_identity(run_dir: Path) -> str:
    """This run's id: the one run.dir records, else a new one, recorded now (a job started without
    `fft-dist launch`, e.g. `fft-dist node` on a hand-written config)."""
    run_id = read_run_id(run_dir)
    if run_id is None:
        run_id = ownership.new_run_id()
        write_run_id(run_dir, run_id)
    return run_id


def _earlier_run(cfg: FFTConfig, run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(what an earlier run left that fft-dist may delete on consent, what it cannot vouch for)."""
    ckpt_root = Path(cfg.checkpoint.dir)
    deletable: list[Path] = []
    unprovable: list[Path] = []
    for _, folder in fmt.iter_committed(ckpt_root):
        (deletable if ownership.proves(folder, Reason.REPLACED_CHECKPOINT, None) else unprovable).append(folder)
    if ckpt_root.is_dir():
        deletable += sorted(p for p in ckpt_root.iterdir() if ownership.temp_owner(p.name))
    latest = ckpt_root / fmt.LATEST_FILE
    if os.path.lexists(latest):
        (deletable if latest.is_file() and not latest.is_symlink() else unprovable).append(latest)
    deletable += [run_dir / n for n in (RUN_MARKER, *RUN_OUTPUTS) if (run_dir / n).is_file()]
    if (run_dir / "tb").is_dir():
        deletable += sorted(p for p in (run_dir / "tb").iterdir() if p.name.startswith(TB_EVENTS) and p.is_file())
    hf = run_dir / "hf"
    if ownership.proves(hf, Reason.REPLACED_EXPORT, None):
        deletable.append(hf)
    elif os.path.lexists(hf) and cfg.checkpoint.export_final:
        unprovable.append(hf)
    return deletable, unprovable


def _names(paths: list[Path], run_dir: Path) -> str:
    """What an earlier run left, said briefly: checkpoint folders by name, run.dir outputs relative to it."""
    shown: list[str] = []
    for p in paths:
        if p.name == RUN_MARKER:
            continue
        name = str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)
        name = "tb/" if name.startswith("tb/") else name + ("/" if p.is_dir() else "")
        if name not in shown:
            shown.append(name)
    return ", ".join(shown[:8]) + (f", ... ({len(shown)} in all)" if len(shown) > 8 else "")


def claim(cfg: FFTConfig, run_dir: Path) -> str:
    """The run id for this job; a fresh run (resume=none) never starts on top of an earlier one.

    Resuming (auto or a path) continues the run that run.dir records. A fresh run refuses when
    run.dir or checkpoint.dir holds what an earlier run left, unless checkpoint.overwrite=true:
    then exactly that is deleted (fft-dist checkpoints with a manifest, fft-dist temporaries,
    ``latest``, config.yaml, metrics.jsonl, tb/ event files, an hf/ export with its marker),
    and nothing it cannot vouch for (then it refuses, naming it).
    """
    if not cfg.resume_request.fresh:
        return run_identity(run_dir)
    deletable, unprovable = _earlier_run(cfg, run_dir)
    if unprovable:
        raise ConfigError(
            f"a fresh run (resume=none) would save into {cfg.checkpoint.dir} or export into {run_dir / 'hf'}, which "
            f"hold {_names(unprovable, run_dir)}: not fft-dist checkpoints or exports it can prove it made, so it never "
            "deletes or saves over them. Move them away or pick another run.dir / checkpoint.dir")
    trivial = {run_dir / RUN_MARKER, run_dir / "config.yaml"}  # a job that stopped before its first step
    if deletable and not cfg.checkpoint.overwrite and not set(deletable) <= trivial:
        raise ConfigError(
            f"run.dir={run_dir} / checkpoint.dir={cfg.checkpoint.dir} hold what an earlier run left "
            f"({_names(deletable, run_dir)}). Continue that run with resume=auto, start a new one in another run.dir, "
            "or replace it on purpose with checkpoint.overwrite=true")
    run_id = ownership.new_run_id()
    for path in deletable:
        if ownership.temp_owner(path.name):
            reason = Reason.REPLACED_TEMPORARY
        elif path.is_dir() and fmt.parse_step(path.name) is not None:
            reason = Reason.REPLACED_CHECKPOINT
        elif path.is_dir():
            reason = Reason.REPLACED_EXPORT
        else:
            reason = Reason.REPLACED_RUN_OUTPUT
        ownership.remove(path, reason, owner=run_id)
    write_run_id(run_dir, run_id)
    return run_id


def prepare_run_dir(cfg: FFTConfig, config_yaml: str) -> Path:
    """Lock run.dir and checkpoint.dir, claim them for this run, then write the one resolved config.yaml."""
    run_dir = Path(cfg.run.dir).resolve()
    lock_run(cfg)
    try:
        claim(cfg, run_dir)
        (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"run.dir={run_dir} is not writable: {e.strerror or e}"
                          f"{f' ({e.filename})' if e.filename else ''}; pick another run.dir") from None
    return run_dir
