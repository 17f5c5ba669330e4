"""The checkpoint root on disk: ``latest``, which folder a user's path means, and probes that it is
writable and that every rank sees the same folder."""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.ownership import temp_name
from fft_dist.checkpoint.schema import read_latest_file


def read_latest(ckpt_root: Path) -> str | None:
    """The ``step-N`` name in ``<root>/latest``; None when there is none. Garbage, a symbolic link or
    anything but a regular file raises (unread; see :func:`.schema.read_latest_file`)."""
    path = Path(ckpt_root) / fmt.LATEST_FILE
    if not os.path.lexists(path):
        return None
    return read_latest_file(path)


def write_latest(ckpt_root: Path, folder_name: str, *, owner: str) -> None:
    """Point ``latest`` at a committed folder: write ``latest.<owner>.tmp``, fsync, os.replace, fsync
    the dir. Only a regular file (or nothing) named ``latest`` is replaced: a folder or a link there
    is the user's, and the error says so."""
    root = Path(ckpt_root)
    target = root / fmt.LATEST_FILE
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise CheckpointError(f"{target} is {'a symbolic link' if target.is_symlink() else 'not a regular file'}, "
                              f"which fft-dist never replaces")
    tmp = root / temp_name(fmt.LATEST_FILE, owner)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(folder_name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fmt.fsync_dir(root)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # our own temporary: its name carries this run's id
        raise CheckpointError(f"cannot update {target}: {e.strerror or e}") from None


def is_root(path: Path) -> bool:
    """A checkpoint root (holds ``latest`` or step-N folders) rather than one checkpoint."""
    path = Path(path)
    return (path.is_dir() and not (path / fmt.MANIFEST_FILE).exists()
            and (os.path.lexists(path / fmt.LATEST_FILE) or bool(fmt.iter_committed(path))))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder a user's path means. Used by every command that takes a checkpoint.

    - ``<root>/latest`` (a regular file, never a link): the folder it names (it must exist);
    - a checkpoint root: the folder ``latest`` names, else its highest ``step-N``;
    - anything else (a ``step-N`` folder, any folder with a manifest): itself.

    Strict: nothing here checks that the result is intact (``verify`` must report what
    ``latest`` names, not quietly pick an older one); ``resume=auto`` falls back on its own
    (:func:`fft_dist.checkpoint.resume.find_resume`).
    """
    p = Path(path)
    if p.name == fmt.LATEST_FILE and (p.is_symlink() or (p.exists() and not p.is_dir())):
        target = p.parent / read_latest_file(p)  # a link or a non-regular file is refused unread
        if not target.is_dir():
            raise CheckpointError(f"{p}: names {target.name}, which does not exist")
        return target
    if p.is_file():
        raise CheckpointError(f"{p}: a file; expected a checkpoint folder, a checkpoint root or its "
                              f"'{fmt.LATEST_FILE}' file")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint (expected a step-N folder, a checkpoint root or its "
                              f"'{fmt.LATEST_FILE}' file)")
    if is_root(p):
        name = read_latest(p)
        if name is not None:
            if not (p / name).is_dir():
                raise CheckpointError(f"{p / fmt.LATEST_FILE}: names {name}, which does not exist")
            return p / name
        return fmt.iter_committed(p)[0][1]
    return p


def check_latest_slot(ckpt_root: Path) -> None:
    """``<root>/latest`` is absent or a regular file: fft-dist writes that name and never replaces a
    folder or a link there (a run would otherwise train to the end and only then fail to point at it)."""
    latest = Path(ckpt_root) / fmt.LATEST_FILE
    if latest.is_symlink() or (latest.exists() and not latest.is_file()):
        kind = "a symbolic link" if latest.is_symlink() else "a folder"
        raise CheckpointError(f"{latest} is {kind}; fft-dist writes its own 'latest' file there and never replaces "
                              f"anything else: move it away, or set checkpoint.dir to another folder")


def check_writable(ckpt_root: str | Path) -> None:
    """Fail early, before training, when checkpoints cannot be written under `ckpt_root`.

    Creates the folder if needed, then writes, fsyncs and removes a small probe file. Raises
    :class:`CheckpointError` naming the path and the OS error (read-only file system, no
    space, permission denied), and when ``latest`` there is a folder or a link (fft-dist writes
    that name as a file and never replaces anything else). Safe on every rank at once: the
    probe's name is per host and pid.
    """
    root = Path(ckpt_root)
    check_latest_slot(root)
    probe = root / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"fft-dist write probe\n" * 200)  # a few KB: a full disk fails here, not at the first save
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        fmt.fsync_dir(root)
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"checkpoint.dir {root} is not writable: {e.strerror or e}"
                              f"{f' ({e.filename})' if e.filename else ''}") from None


SHARED_WAIT_S = 10.0
"""How long a rank looks for rank 0's probe before calling checkpoint.dir unshared: NFS caches a
folder's attributes (and a name's absence) for seconds; listing the folder between tries revalidates."""
SHARED_FS_HELP = ("it must be on a shared file system (NFS, Lustre, GPFS, ...) mounted at "
                  "the same path on every node: each rank writes its shards of every checkpoint there, so "
                  "node-local disks would fail the first save")


def write_shared_probe(ckpt_root: Path, *, owner: str) -> tuple[str, str]:
    """Rank 0: write a random token under a new name (a temporary of run `owner`); (name, token)."""
    token = uuid.uuid4().hex
    name = temp_name(f".shared-probe-{token[:12]}", owner)
    with open(Path(ckpt_root) / name, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    fmt.fsync_dir(Path(ckpt_root))
    return name, token


def read_shared_probe(ckpt_root: Path, name: str, token: str, *, writer_host: str,
                      wait_s: float = SHARED_WAIT_S) -> str | None:
    """Every other rank: open rank 0's probe by its name (a bounded retry, for NFS attribute caching);
    None when it holds rank 0's token, else the problem, the same on every rank of a host."""
    path, host = Path(ckpt_root) / name, socket.gethostname()
    deadline, delay = time.monotonic() + wait_s, 0.05
    while True:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                found = f.read().strip()
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                return (f"on host {host}, {path} (written by rank 0 on host {writer_host}) is not there after "
                        f"{wait_s:.0f} s")
            try:
                os.listdir(ckpt_root)
            except OSError:
                pass
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        except OSError as e:
            return f"on host {host}, cannot read {path}: {e.strerror or e}"
    return None if found == token else f"on host {host}, {path} holds another token than rank 0 wrote"
