"""Which checkpoint a run resumes from (``resume=none|auto|<path>``), skipping damaged ones loudly."""
from __future__ import annotations

from pathlib import Path

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.integrity import quick_problems
from fft_dist.checkpoint.layout import is_root, read_latest, resolve_checkpoint
from fft_dist.dist import warn0


def newest_intact(ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """(the checkpoint to resume from, what is wrong under the root) by the cheap check.

    The folder ``latest`` names when it is intact; otherwise the highest intact ``step-N``.
    The notes name every damaged folder and a bad ``latest``; nothing is changed on disk.
    """
    root = Path(ckpt_root)
    notes: list[str] = []
    try:
        latest = read_latest(root)
    except CheckpointError as e:
        latest = None
        notes.append(f"ignoring {e}")
    damaged: dict[str, str] = {}
    intact: list[Path] = []
    for _, folder in fmt.iter_committed(root):
        problems = quick_problems(folder)
        if problems:
            damaged[folder.name] = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        else:
            intact.append(folder)
    if latest is not None and not (root / latest).is_dir():
        notes.append(f"{root / fmt.LATEST_FILE} names {latest}, which does not exist")
    notes += [f"damaged checkpoint {name}: {why}" for name, why in damaged.items()]
    chosen = next((p for p in intact if p.name == latest), intact[0] if intact else None)
    return chosen, notes


def newest_complete(ckpt_root: Path) -> Path | None:
    """The checkpoint ``resume=auto`` would pick (no warnings, no errors); None if there is none."""
    return newest_intact(Path(ckpt_root))[0] if Path(ckpt_root).is_dir() else None


def _from_root(root: Path, what: str) -> Path | None:
    chosen, notes = newest_intact(root)
    if chosen is None and fmt.iter_committed(root):
        raise CheckpointError(f"{what}: checkpoints exist under {root} but none is intact; refusing to start "
                              f"again from step 0 over them:\n  " + "\n  ".join(notes)
                              + "\n  (inspect with `fft-dist ckpt verify`; move them away, or set resume=none "
                                "to start fresh)")
    if notes:
        where = f"resuming from {chosen.name}" if chosen is not None else "starting fresh"
        warn0(f"{what}: {where}; damaged checkpoints are never loaded or pruned (delete them after a look "
              f"with `fft-dist ckpt verify`):\n  " + "\n  ".join(notes))
    return chosen


def find_resume(resume: str | None, ckpt_root: Path) -> Path | None:
    """The checkpoint folder to resume from, by the cheap check; load_checkpoint then verifies sha256.

    - ``none`` (or empty): None.
    - ``auto``: the newest intact checkpoint under `ckpt_root` (see :func:`newest_intact`), with a
      warning on rank 0 naming every damaged one; None when the root has no ``step-N`` folder
      (start fresh); CheckpointError when it has some but none is intact.
    - a checkpoint root: as ``auto`` on that root, but having nothing to resume is an error.
    - ``<root>/latest`` or a ``step-N`` folder: exactly that checkpoint; CheckpointError if damaged.
    """
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        root = Path(ckpt_root)
        return _from_root(root, "resume=auto") if root.is_dir() else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume={resume}: {path} does not exist")
    if is_root(path):
        found = _from_root(path, f"resume={resume}")
        if found is None:
            raise CheckpointError(f"resume={resume}: {path} is a checkpoint root with no checkpoint")
        return found
    path = resolve_checkpoint(path)
    problems = quick_problems(path)
    if problems:
        raise CheckpointError(f"resume={resume}: {path} is not a complete checkpoint:\n  " + "\n  ".join(problems))
    return path
