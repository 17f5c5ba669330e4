"""The lock on run.dir and checkpoint.dir: flock where the file system has it, else a lease file.

flock comes first: the kernel drops it with the process, so a crashed job never leaves a stale
lock. Shared file systems often lack it: Lustre mounted without ``-o flock`` answers ENOSYS, NFS
without lockd ENOLCK, some FUSE file systems EOPNOTSUPP. There the lock is a file created with
O_EXCL (atomic on NFSv3+, Lustre, GPFS) that names its holder (host, pid, process start time,
SLURM job) and a lease that a daemon thread of the holder renews. A lease not renewed in time is
stale and is taken over, as is one of a process of this host that is gone, or of an earlier
attempt of the same SLURM job: a job requeued onto another node needs no manual step. Expiry
compares the holder's clock with ours: cluster nodes keep NTP time, and the lease is minutes long.

The lease file is removed only after it was renamed to a name that carries this process's token
(one atomic step) and proven to be the file this process created, through
:func:`fft_dist.checkpoint.ownership.remove`.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from fft_dist.checkpoint import ownership
from fft_dist.checkpoint.ownership import Reason
from fft_dist.errors import CheckpointError
from fft_dist.processes import process_token, token_is_stale

LOCK_FILE = ".fft-dist.lock"
"""The flock target (kept: a lock file that disappears could be locked twice)."""
LEASE_FILE = ".fft-dist.lease"
"""The O_EXCL lock where flock is missing; present only while its holder runs (or until its lease expires)."""
LEASE_S = 180
"""A lease not renewed for this long is stale (a holder renews every :data:`RENEW_S`)."""
RENEW_S = 30
NO_FLOCK = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})
"""flock's answers on file systems without it (Lustre noflock, NFS without lockd, FUSE)."""
_SIZE = 1024  # the lease is rewritten in place at this fixed size: a reader never sees a shorter tail
_held: dict[str, object] = {}  # folder -> open flock file or Lease; lives as long as this process
_warned: list[str] = []


class Held(Exception):
    """Another live job holds the folder; the message names it (pid, host, start)."""


def holder_info() -> dict:
    """Who takes a lock: enough for a person (host, pid, time) and for a later job to judge staleness."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": process_token(), "pidns": _pid_namespace(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def describe(info: dict | None) -> str:
    info = info or {}
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
    if "renewed" in info:
        age = time.time() - float(info["renewed"])
        text += f"; lease renewed {age:.0f} s ago, stale after {float(info.get('lease_s', LEASE_S)):.0f} s"
    return text


def holds(folder: Path) -> bool:
    return str(folder) in _held


def acquire(folder: Path, what: str) -> None:
    """Lock `folder` (which exists) for this process, or raise :class:`Held`; OSError when it cannot be written."""
    key = str(folder)
    if key in _held:
        return
    f = open(folder / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        info = _parse(f.read())
        f.close()
        raise Held(describe(info)) from None
    except OSError as e:
        f.close()
        if e.errno not in NO_FLOCK:
            raise
        if not _warned:  # one line per process: run.dir and checkpoint.dir are usually on one file system
            _warned.append(what)
            print(f"fft-dist: warning: {what}={folder}: flock is not available there ({e.strerror}: e.g. Lustre "
                  f"without -o flock, NFS without lockd); locking with a lease file ({LEASE_FILE}) instead, renewed "
                  f"every {RENEW_S} s, stale {LEASE_S} s after its holder stops", file=sys.stderr, flush=True)
        _held[key] = Lease.take(folder / LEASE_FILE, what)
        return
    lease = _read(folder / LEASE_FILE)  # a job on a client without flock locks the same folder by lease
    if lease is not None and not _stale(*lease):
        f.close()
        raise Held(describe(lease[0]))
    f.seek(0)
    f.truncate()
    f.write(json.dumps(holder_info()) + "\n")
    f.flush()
    _held[key] = f


def release_all() -> None:
    """Give up this process's locks (a SLURM submitter, whose job's first node takes them; process exit)."""
    while _held:
        item = _held.popitem()[1]
        item.release() if isinstance(item, Lease) else item.close()


def _parse(text: str) -> dict | None:
    try:
        obj = json.loads(text.strip() or "{}")
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _read(path: Path) -> tuple[dict | None, os.stat_result] | None:
    """(the lease's holder, or None when unreadable; its stat) or None when there is no lease."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _parse(f.read()), os.fstat(f.fileno())
    except FileNotFoundError:
        return None


def _stale(info: dict | None, st: os.stat_result) -> bool:
    """Expired; or its holder is a process of this host that is gone; or an earlier attempt of our SLURM job."""
    now = time.time()
    try:
        if now - float(info["renewed"]) > float(info.get("lease_s", LEASE_S)):
            return True
        if info.get("pidns") == _pid_namespace() and token_is_stale(str(info.get("token", ""))):
            return True
        job = os.environ.get("SLURM_JOB_ID", "")
        return bool(job) and info.get("slurm_job") == job and int(info.get("slurm_restart", 0)) < int(
            os.environ.get("SLURM_RESTART_COUNT") or 0)
    except (TypeError, KeyError, ValueError, AttributeError):  # torn or foreign: judged by the file's age alone
        return now - st.st_mtime > LEASE_S


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_mtime_ns, a.st_size) == (b.st_dev, b.st_ino, b.st_mtime_ns, b.st_size)


class Lease:
    """An O_EXCL lease file this process created and renews from a daemon thread until :meth:`release`."""

    def __init__(self, path: Path, fd: int, info: dict):
        self.path, self.fd, self.info = path, fd, info
        self.token = info["token"]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew_loop, name="fft-dist-lease", daemon=True)

    @classmethod
    def take(cls, path: Path, what: str) -> Lease:
        info = {**holder_info(), "lease_s": LEASE_S}
        found = None
        for _ in range(5):  # a lost race with another job taking over the same stale lease: look again
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                found = _read(path)
                if found is None:
                    continue
                if not _stale(*found):
                    raise Held(describe(found[0])) from None
                if _take_over(path, found[1], token=info["token"]):
                    print(f"fft-dist: warning: {what}={path.parent}: took over a stale lock lease "
                          f"({describe(found[0])})", file=sys.stderr, flush=True)
                continue
            lease = cls(path, fd, info)
            lease._write()
            lease.thread.start()
            atexit.register(lease.release)
            from fft_dist.dist import before_exit  # a rank ends with os._exit, which skips atexit

            before_exit(lease.release)
            return lease
        raise Held(describe(found[0] if found else None))

    def _write(self) -> None:
        text = json.dumps({**self.info, "renewed": time.time()})
        os.pwrite(self.fd, (text + " " * max(0, _SIZE - 1 - len(text)) + "\n").encode(), 0)
        os.fsync(self.fd)

    def ours(self) -> bool:
        """The file at our path is still the one we created (not taken over after our lease expired)."""
        try:
            st, mine = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _renew_loop(self) -> None:
        while not self.stop.wait(RENEW_S):
            if not self.ours():
                print(f"fft-dist: warning: lost the lock lease {self.path}: it expired and another job took it "
                      "over (this process was stalled longer than the lease)", file=sys.stderr, flush=True)
                return
            try:
                self._write()
            except OSError as e:  # a file-system hiccup: the next renewal may succeed
                print(f"fft-dist: warning: cannot renew the lock lease {self.path}: {e.strerror or e}",
                      file=sys.stderr, flush=True)

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still ours; never raises (runs at exit)."""
        if self.stop.is_set():
            return
        self.stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)  # not mid-write when the descriptor closes
        try:
            if self.ours():
                _take_over(self.path, os.fstat(self.fd), token=self.token, strict=False)
        except (OSError, CheckpointError) as e:
            print(f"fft-dist: warning: cannot remove the lock lease {self.path}: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr, flush=True)
        finally:
            os.close(self.fd)


def _take_over(path: Path, judged: os.stat_result, *, token: str, strict: bool = True) -> bool:
    """Move the lease at `path` to a name carrying `token`, then delete it if it is the file that was
    judged (its inode; `strict`: also its size and time, i.e. not renewed since); else put it back
    (never over a newer lease). True: it is gone."""
    trash = path.with_name(ownership.trash_name(path.name, token))
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False  # someone else moved it first
    moved = os.stat(trash)
    same = _same(moved, judged) if strict else (moved.st_dev, moved.st_ino) == (judged.st_dev, judged.st_ino)
    if not same:  # a fresh lease (renewed, or another job's) slipped in: restore it, never overwrite one
        try:
            os.link(trash, path)
        except FileExistsError:
            pass
    ownership.remove(trash, Reason.OWN_TEMPORARY, owner=token)
    return same
