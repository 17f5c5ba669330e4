"""run.dir and checkpoint.dir locks on shared file systems without flock (issue #17): Lustre's default
noflock (ENOSYS), NFS without lockd (ENOLCK) and FUSE (EOPNOTSUPP) get an O_EXCL lease file instead of
a traceback; a live lease refuses a second job, a stale one (expired, its process gone, or an earlier
attempt of the same SLURM job) is taken over, and only our own lease file is ever removed.

In-process cases fake flock's error; one real case runs `fft-dist train` under an LD_PRELOAD shim
whose flock() returns ENOSYS (compiled here with cc; skipped, saying why, without a compiler)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY_MODEL, child_env
from fft_dist import locks
from locks_shared import write_lease


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
