"""run.dir and checkpoint.dir locks on shared file systems without flock (issue #17): Lustre's default
noflock (ENOSYS), NFS without lockd (ENOLCK) and FUSE (EOPNOTSUPP) get an O_EXCL lease file instead of
a traceback; a live lease refuses a second job, a stale one (expired, its process gone, or an earlier
attempt of the same SLURM job) is taken over, and only our own lease file is ever removed.

In-process cases fake flock's error; one real case runs `fft-dist train` under an LD_PRELOAD shim
whose flock() returns ENOSYS (compiled here with cc; skipped, saying why, without a compiler)."""
from __future__ import annotations

import errno
import json
import os
import time

import pytest

from fft_dist import locks
from fft_dist.config import ConfigError
from fft_dist.rundir import RunDirBusy, lock_dir
from locks_shared import write_lease


@pytest.fixture
def no_flock(monkeypatch):
    """flock fails as on Lustre without -o flock; this process's locks are given up afterwards."""
    def flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    monkeypatch.setattr(locks, "_warned", [])
    yield
    locks.release_all()


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_no_flock_falls_back_to_a_lease_file_with_one_warning(tmp_path, monkeypatch, capsys, code):
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    monkeypatch.setattr(locks, "_warned", [])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mydata.tmp").write_text("mine")
    try:
        lock_dir(tmp_path / "run", "run.dir")
        lock_dir(tmp_path / "run" / "checkpoints", "checkpoint.dir")
        lease = json.loads((tmp_path / "run" / locks.LEASE_FILE).read_text())
        assert (lease["pid"], lease["lease_s"]) == (os.getpid(), locks.LEASE_S) and lease["renewed"] <= time.time()
        assert {"host", "started", "token"} <= set(lease)
        err = capsys.readouterr().err
        assert err.count("flock is not available") == 1 and os.strerror(code) in err, err
    finally:
        locks.release_all()
    assert not (tmp_path / "run" / locks.LEASE_FILE).exists()
    assert not (tmp_path / "run" / "checkpoints" / locks.LEASE_FILE).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".fft-dist.lock", "checkpoints", "mydata.tmp"]


def test_a_live_lease_refuses_and_is_left_alone(tmp_path, no_flock):
    path = write_lease(tmp_path / "run")
    before = path.read_bytes()
    with pytest.raises(RunDirBusy, match=r"is in use by another fft-dist run \(pid 4242 on host node-gone"):
        lock_dir(tmp_path / "run", "run.dir")
    assert path.read_bytes() == before


def test_an_expired_lease_is_taken_over(tmp_path, no_flock, capsys):
    write_lease(tmp_path / "run", renewed=time.time() - locks.LEASE_S - 5)
    lock_dir(tmp_path / "run", "run.dir")
    assert json.loads((tmp_path / "run" / locks.LEASE_FILE).read_text())["pid"] == os.getpid()
    assert "took over a stale lock lease (pid 4242 on host node-gone" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []


def test_a_requeued_slurm_job_takes_its_own_lease_over_at_once(tmp_path, no_flock, monkeypatch):
    """The first attempt ran on another node; its lease has not expired yet, but it is this job's."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lease(tmp_path / "other", slurm_job="78")
    with pytest.raises(RunDirBusy):
        lock_dir(tmp_path / "other", "run.dir")
    write_lease(tmp_path / "run", slurm_job="77", slurm_restart=0)
    lock_dir(tmp_path / "run", "run.dir")
    assert json.loads((tmp_path / "run" / locks.LEASE_FILE).read_text())["slurm_restart"] == 1


def test_the_lease_is_renewed_and_a_lease_taken_over_meanwhile_is_not_removed(tmp_path, no_flock, monkeypatch):
    monkeypatch.setattr(locks, "RENEW_S", 0.05)
    lock_dir(tmp_path / "run", "run.dir")
    path = tmp_path / "run" / locks.LEASE_FILE
    first = json.loads(path.read_text())["renewed"]
    deadline = time.time() + 10
    while json.loads(path.read_text())["renewed"] == first:
        assert time.time() < deadline, "the lease was never renewed"
        time.sleep(0.02)
    os.replace(write_lease(tmp_path / "elsewhere"), path)  # another job's lease now (ours had expired)
    locks.release_all()
    assert json.loads(path.read_text())["pid"] == 4242, "release removed a lease that is not ours"


def test_flock_and_a_live_lease_of_a_client_without_flock_exclude_each_other(tmp_path):
    write_lease(tmp_path / "run")
    with pytest.raises(RunDirBusy, match="pid 4242 on host node-gone"):
        lock_dir(tmp_path / "run", "run.dir")
    locks.release_all()


def test_other_flock_errors_are_config_errors(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    with pytest.raises(ConfigError, match="run.dir=.* is not writable: Input/output error"):
        lock_dir(tmp_path / "run", "run.dir")
