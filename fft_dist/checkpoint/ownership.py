"""What fft-dist made, and the one function through which it deletes anything.

A name alone does not prove that fft-dist made a folder: users keep their own files next to
checkpoints, and may copy another run's ``step-0000100`` in to resume from it. So every thing
fft-dist creates carries the id of the run that made it (``run.dir/.fft-dist-run.json`` holds
it, :mod:`fft_dist.rundir`):

- a committed checkpoint: its ``MANIFEST.json`` names the run (``run_id``);
- a temporary (a save in progress, a checkpoint on its way out, ``latest``'s replacement): the
  run id is part of its *name*, created atomically with it, so a kill at any instant leaves
  nothing unmarked; an export being written names its process instead (host, pid, start time:
  :func:`fft_dist.processes.process_token`), so the next export can remove what a killed one left;
- an export folder: a marker file inside (:data:`EXPORT_MARKER`).

:func:`remove` is the only place that deletes, and it checks the proof for the reason it is
given. Everything else (a user's ``mydata.tmp``, ``step-plan.md``, a symlink named ``step-N``,
a damaged folder nobody can vouch for) is never touched.
"""
from __future__ import annotations

import enum
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.processes import token_is_stale

RUN_ID_RE = re.compile(r"^[0-9a-f]{12,64}$")
TEMP_RE = re.compile(r"^(?P<base>.+)\.(?P<owner>[0-9a-f]{12,64})(?P<old>\.old)?\.tmp$")
"""``<name>.<run id>.tmp`` (being written) and ``<name>.<run id>.old.tmp`` (being deleted)."""
EXPORT_MARKER = ".fft-dist-export.json"
"""Inside an export folder: which run (or which ``fft-dist export`` process) wrote it."""
SET_ASIDE_SUFFIX = ".damaged"


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r} is not 12-64 lowercase hex digits")
    return run_id


def temp_name(name: str, owner: str) -> str:
    """The name under which `name` is written before it is complete (owner: a run id)."""
    return f"{name}.{check_run_id(owner)}.tmp"


def trash_name(name: str, owner: str) -> str:
    """The name a folder gets (one atomic rename) before it is deleted, so a kill mid-delete never
    leaves a half-deleted ``step-N``."""
    return f"{name}.{check_run_id(owner)}.old.tmp"


def temp_owner(name: str) -> str | None:
    """The run id in a temporary's name (None: not one of fft-dist's temporaries)."""
    m = TEMP_RE.match(name)
    return m.group("owner") if m else None


def manifest_run_id(folder: Path) -> str | None:
    """The run that committed a checkpoint folder, from its manifest (None: not provable)."""
    from fft_dist.checkpoint.schema import read_manifest

    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        return read_manifest(folder).get("run_id")
    except CheckpointError:
        return None


def is_fft_dist_checkpoint(folder: Path) -> bool:
    """A real folder with a valid fft-dist manifest (of any run)."""
    from fft_dist.checkpoint.schema import read_manifest

    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        read_manifest(folder)
        return True
    except CheckpointError:
        return False


def export_marker(out_dir: Path) -> dict | None:
    """The export marker of a folder (None when it has none or it is unreadable)."""
    path = Path(out_dir) / EXPORT_MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_export_marker(out_dir: Path, **fields) -> None:
    (Path(out_dir) / EXPORT_MARKER).write_text(json.dumps(fields, indent=1) + "\n", encoding="utf-8")


class Reason(enum.Enum):
    """Why something may be deleted; :func:`remove` checks the proof each one needs. The
    ``REPLACED_*`` reasons need the user's consent (``checkpoint.overwrite=true``) besides the proof."""

    OWN_TEMPORARY = "a temporary of this run (its name carries the run id)"
    REPLACED_TEMPORARY = "a temporary of an earlier fft-dist run (its name carries a run id)"
    STALE_TEMPORARY = "a temporary of an fft-dist process of this host that is no longer running (its name says which)"
    OWN_CHECKPOINT = "a checkpoint this run committed (its manifest names the run id)"
    REPLACED_CHECKPOINT = "an fft-dist checkpoint (a step-N folder with a valid manifest)"
    OWN_EXPORT = "an export this run wrote (its marker names the run id)"
    REPLACED_EXPORT = "an fft-dist export (it holds an fft-dist export marker)"
    REPLACED_RUN_OUTPUT = "an output file of an earlier run (a regular file)"


def proves(path: Path, reason: Reason, owner: str | None) -> bool:
    """Whether `path` carries the proof `reason` needs (`owner`: this run's id)."""
    path = Path(path)
    if reason in (Reason.OWN_TEMPORARY, Reason.REPLACED_TEMPORARY, Reason.STALE_TEMPORARY):
        found = temp_owner(path.name)
        if found is None:
            return False
        if reason == Reason.STALE_TEMPORARY:
            return token_is_stale(found)
        return reason == Reason.REPLACED_TEMPORARY or found == owner
    if path.is_symlink():
        return False  # a link is never ours: deleting through it could reach what it points to
    if reason == Reason.OWN_CHECKPOINT:
        return fmt.parse_step(path.name) is not None and manifest_run_id(path) == owner
    if reason == Reason.REPLACED_CHECKPOINT:
        return fmt.parse_step(path.name) is not None and is_fft_dist_checkpoint(path)
    if reason in (Reason.OWN_EXPORT, Reason.REPLACED_EXPORT):
        marker = export_marker(path)
        return path.is_dir() and marker is not None and (reason == Reason.REPLACED_EXPORT
                                                         or marker.get("run_id") == owner)
    if reason == Reason.REPLACED_RUN_OUTPUT:
        return path.is_file()  # the caller names the file (config.yaml, metrics.jsonl, latest, tb events)
    raise AssertionError(reason)


def remove(path: Path, reason: Reason, *, owner: str) -> None:
    """Delete `path`, after checking that it carries the proof `reason` needs; the only delete.

    A folder is first renamed to its trash name (one atomic step) and then removed, so a kill
    leaves either the whole folder or a temporary that names its owner. `owner`: this run's id
    (also what the trash name carries). Raises CheckpointError, deleting nothing, when the proof
    is missing.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not proves(path, reason, owner):
        raise CheckpointError(f"refusing to delete {path}: it is not {reason.value}")
    if path.is_dir() and not path.is_symlink():
        if TEMP_RE.match(path.name) is None:
            trash = path.with_name(trash_name(path.name, owner))
            os.rename(path, trash)
            path = trash
        shutil.rmtree(path)
    else:
        path.unlink()


def set_aside(folder: Path, *, owner: str) -> Path:
    """Rename a damaged checkpoint of this run out of the way (``step-N.damaged``, ``-2`` ...): it
    is kept for a person to inspect, never read, pruned or deleted, and no longer blocks a save."""
    folder = Path(folder)
    if manifest_run_id(folder) != owner:
        raise CheckpointError(f"refusing to move {folder}: its manifest does not name this run ({owner})")
    target = folder.with_name(folder.name + SET_ASIDE_SUFFIX)
    n = 2
    while os.path.lexists(target):
        target = folder.with_name(f"{folder.name}{SET_ASIDE_SUFFIX}-{n}")
        n += 1
    os.rename(folder, target)
    fmt.fsync_dir(folder.parent)
    return target
