"""Which checkpoint a run resumes from (``resume=none|auto|<path>``), skipping damaged ones loudly.

``auto`` (and a checkpoint root given as the path) means *the newest intact checkpoint*: the
highest ``step-N`` that passes the cheap check, whatever ``latest`` says (a kill between a
commit and the update of ``latest`` leaves ``latest`` one behind). The cheap check cannot see a
flipped bit, so the run then hashes that checkpoint on every rank (:func:`choose_verified`); if
it fails, all ranks agree and the next older intact one is tried, with a warning naming the bad
one. Under SLURM requeue or torchrun restarts every attempt then gets on, instead of failing on
the same corrupt file each time.
"""
from __future__ import annotations

from pathlib import Path

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint import ownership
from fft_dist.checkpoint.collective import agree, agree_or_raise
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.integrity import check_files, quick_problems
from fft_dist.checkpoint.layout import is_root, read_latest, resolve_checkpoint
from fft_dist.checkpoint.schema import read_manifest
from fft_dist.config import ResumeKind, ResumeRequest
from fft_dist.dist import rank_world, warn0

NONE_INTACT_HINT = ("inspect them with `fft-dist ckpt verify`; to start again from step 0, move them away (or set "
                    "checkpoint.dir to another folder), or delete the fft-dist ones on purpose with resume=none "
                    "checkpoint.overwrite=true")


def intact_checkpoints(ckpt_root: Path) -> tuple[list[Path], list[str]]:
    """(every intact checkpoint under the root, newest step first; what is wrong there), by the cheap
    check. The notes name every damaged folder and a bad ``latest``; nothing is changed on disk."""
    root = Path(ckpt_root)
    notes: list[str] = []
    try:
        latest = read_latest(root)
    except CheckpointError as e:
        latest = None
        notes.append(f"ignoring {e}")
    intact: list[Path] = []
    for _, folder in fmt.iter_committed(root):
        problems = quick_problems(folder)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            notes.append(f"damaged checkpoint {folder.name}: {problems[0]}{more}")
        else:
            intact.append(folder)
    if latest is not None and not (root / latest).is_dir():
        notes.append(f"{root / fmt.LATEST_FILE} names {latest}, which does not exist")
    return intact, notes


def newest_intact(ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """(the newest intact checkpoint, the notes of :func:`intact_checkpoints`)."""
    intact, notes = intact_checkpoints(ckpt_root)
    return (intact[0] if intact else None), notes


def newest_complete(ckpt_root: Path) -> Path | None:
    """The checkpoint ``resume=auto`` would pick (no warnings, no errors); None if there is none."""
    return newest_intact(Path(ckpt_root))[0] if Path(ckpt_root).is_dir() else None


def _from_root(root: Path, what: str, *, warn: bool = True) -> list[Path]:
    intact, notes = intact_checkpoints(root)
    if not intact and fmt.iter_committed(root):
        raise CheckpointError(f"{what}: checkpoints exist under {root} but none is intact; refusing to start "
                              f"again from step 0 over them:\n  " + "\n  ".join(notes) + f"\n  ({NONE_INTACT_HINT})")
    if notes and warn:
        where = f"resuming from {intact[0].name}, the newest intact checkpoint" if intact else "starting fresh"
        warn0(f"{what}: {where}; damaged checkpoints are never loaded or pruned (delete them after a look "
              f"with `fft-dist ckpt verify`):\n  " + "\n  ".join(notes))
    return intact


def resume_candidates(resume: str | None, ckpt_root: Path, *, warn: bool = True) -> list[Path]:
    """The checkpoints a run may resume from, in the order to try them (cheap check only).

    - ``none`` (or empty): [].
    - ``auto``: every intact checkpoint under `ckpt_root`, newest first (a warning on rank 0 names
      every damaged one); [] when the root has no ``step-N`` folder (start fresh); CheckpointError
      when it has some but none is intact.
    - a checkpoint root: as ``auto`` on that root, but having nothing to resume is an error.
    - ``<root>/latest`` or a ``step-N`` folder: exactly that one; CheckpointError if damaged.
    """
    request = ResumeRequest.parse(resume)
    if request.kind is ResumeKind.none:
        return []
    if request.kind is ResumeKind.auto:
        root = Path(ckpt_root)
        return _from_root(root, "resume=auto", warn=warn) if root.is_dir() else []
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume={resume}: {path} does not exist")
    if is_root(path):
        found = _from_root(path, f"resume={resume}", warn=warn)
        if not found:
            raise CheckpointError(f"resume={resume}: {path} is a checkpoint root with no checkpoint")
        return found
    path = resolve_checkpoint(path)
    problems = quick_problems(path)
    if problems:
        raise CheckpointError(f"resume={resume}: {path} is not a complete checkpoint:\n  " + "\n  ".join(problems))
    return [path]


def find_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """The checkpoint a run would resume from by the cheap check (first of :func:`resume_candidates`)."""
    found = resume_candidates(resume, ckpt_root)
    return found[0] if found else None


def _checksum_problems(path: Path) -> list[str]:
    """sha256 of every file of `path`, split over the ranks (largest first, round-robin). Collective."""
    rank, world = rank_world()
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return agree([str(e)])
    names = sorted(manifest["files"], key=lambda f: -manifest["files"][f]["size"])
    return agree(check_files(path, manifest, checksums=True, only=names[rank::world]))


def choose_verified(resume: str | None, ckpt_root: Path) -> tuple[Path | None, list[Path]]:
    """(the checkpoint to resume from, every newer candidate that failed its checksums). Collective.

    Hashes each candidate of :func:`resume_candidates` in turn until one passes. With ``auto`` or
    a root, a corrupt one is skipped with a warning; a checkpoint named explicitly must pass.
    Every rank sees the same files and the same agreed problems, so all choose the same folder.
    """
    candidates = resume_candidates(resume, ckpt_root, warn=rank_world()[0] == 0)
    request = ResumeRequest.parse(resume)
    explicit = request.kind is ResumeKind.path and not is_root(request.path)
    corrupt: list[Path] = []
    for path in candidates:
        problems = _checksum_problems(path)
        if not problems:
            if corrupt:
                warn0(f"resume={resume}: resuming from {path.name}, the newest checkpoint whose checksums all match")
            return path, corrupt
        if explicit:
            agree_or_raise(problems, f"cannot load {path}:")
        warn0(f"resume={resume}: {path.name} fails verification, trying the next older intact checkpoint:\n  "
              + "\n  ".join(problems[:5]))
        corrupt.append(path)
    if corrupt:
        raise CheckpointError(f"resume={resume}: no checkpoint under {Path(ckpt_root)} passes verification "
                              f"({', '.join(p.name for p in corrupt)}); {NONE_INTACT_HINT}")
    return None, corrupt


def clear_the_way(ckpt_root: Path, *, resume_step: int, run_id: str, corrupt: list[Path] = ()) -> list[str]:
    """Make sure no save of a run resumed at `resume_step` lands on an existing ``step-N``. Rank 0;
    returns the problems (the caller agrees them across ranks).

    A committed checkpoint is never saved over. Every ``step-N`` folder newer than the resume point is:
    - damaged or corrupt, and this run's (its manifest names `run_id`): renamed ``step-N.damaged``
      (kept for a person to inspect; never read, pruned or deleted), with a warning;
    - anything else (intact, e.g. when resuming from an older checkpoint on purpose; or not provably
      this run's): a problem, so the run stops before training instead of at that save.
    """
    root = Path(ckpt_root)
    problems: list[str] = []
    bad = {p.name for p in corrupt}
    for step, folder in fmt.iter_committed(root):
        if step <= resume_step:
            continue
        damaged = folder.name in bad or bool(quick_problems(folder))
        if damaged and ownership.manifest_run_id(folder) == run_id:
            moved = ownership.set_aside(folder, owner=run_id)
            warn0(f"{folder.name} is damaged and newer than the resume point; renamed to {moved.name} (kept for "
                  f"inspection, never deleted), so this run can save step {step} again")
            continue
        state = "damaged, and its manifest does not name this run" if damaged else "a complete checkpoint"
        problems.append(f"{folder} ({state}) is newer than the resume point (step {resume_step}), and fft-dist "
                        f"never saves over it: move it away, set checkpoint.dir to another folder, or resume=auto "
                        f"to continue from the newest intact checkpoint")
    return problems


def after_restart(resume: str) -> str:
    """The restart rule: a rank restarted by torchrun (--max-restarts) or a SLURM requeue continues its
    own run, so ``none`` becomes ``auto`` (the first start already claimed checkpoint.dir, and its
    checkpoints are this run's); ``auto`` and a path stay as they are."""
    return ResumeKind.auto.value if ResumeRequest.parse(resume).fresh else resume
