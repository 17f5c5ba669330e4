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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY_MODEL, child_env
from fft_dist import locks
from fft_dist.config import ConfigError
from fft_dist.rundir import RunDirBusy, lock_dir

OTHER_HOST = {"pid": 4242, "host": "node-gone", "started": "2026-01-01T00:00:00+0000", "token": "ab" * 16,
              "pidns": "pid:[1]", "slurm_job": "", "slurm_restart": 0, "lease_s": locks.LEASE_S}


@pytest.fixture
def no_flock(monkeypatch):
    """flock fails as on Lustre without -o flock; this process's locks are given up afterwards."""
    def flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    monkeypatch.setattr(locks, "_warned", [])
    yield
    locks.release_all()


def write_lease(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / locks.LEASE_FILE
    path.write_text(json.dumps({**OTHER_HOST, "renewed": time.time(), **fields}))
    return path


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


# -- for real: `fft-dist train` with a flock() that returns ENOSYS ------------------------------------------
SHIM = "#include <errno.h>\nint flock(int fd, int op) { (void)fd; (void)op; errno = ENOSYS; return -1; }\n"
ONE_RANK = [*TINY_MODEL, "parallelism=none", "launcher.nproc_per_node=1", "data.max_length=64", "data.max_examples=64",
            "train.global_batch_size=4", "train.micro_batch_size=4", "train.warmup_steps=0", "eval.every_steps=0",
            "eval.max_batches=1"]


@pytest.fixture
def enosys_env(tmp_path) -> dict:
    """The environment of a job whose flock() fails with ENOSYS (an LD_PRELOAD shim)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("SKIP reason: no C compiler (cc) to build the flock shim")
        pytest.skip("no C compiler (cc) to build the flock shim")
    (tmp_path / "shim.c").write_text(SHIM)
    proc = subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"), str(tmp_path / "shim.c")],
                          capture_output=True, text=True)
    if proc.returncode:
        print(f"SKIP reason: cc could not build the flock shim: {proc.stderr.strip()}")
        pytest.skip(f"cc could not build the flock shim: {proc.stderr.strip()}")
    return child_env(LD_PRELOAD=str(tmp_path / "shim.so"))


@pytest.mark.slow
def test_a_real_job_without_flock_holds_a_lease_refuses_a_second_and_took_over_a_stale_one(tmp_path, enosys_env):
    run = tmp_path / "run"
    stale = write_lease(run, renewed=time.time() - 3600)  # a job on another node died an hour ago
    first = subprocess.Popen([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run}", *ONE_RANK,
                              "train.max_steps=100000"], cwd=REPO, env=enosys_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or '"loss"' not in (run / "metrics.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        assert json.loads(stale.read_text())["pid"] == first.pid
        second = subprocess.run([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run}", *ONE_RANK,
                                 "resume=auto"], cwd=REPO, env=enosys_env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another fft-dist run (pid {first.pid} on host" in second.stderr and "lease renewed" in \
            second.stderr and "Traceback" not in second.stderr, second.stderr[-3000:]
        os.kill(first.pid, signal.SIGTERM)
        out, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    assert first.returncode == 75, err[-3000:]
    assert "Traceback" not in err and err.count("flock is not available") == 1, err[-3000:]
    assert "took over a stale lock lease (pid 4242 on host node-gone" in err, err[-3000:]
    assert "collective timeout 600 s (dist.timeout_s auto: the CPU default)" in out, out[-3000:]
    leftovers = [p for p in run.rglob("*") if p.name == locks.LEASE_FILE or p.name.endswith(".tmp")]
    assert leftovers == [], f"the job's lease files must go with it: {leftovers}"
