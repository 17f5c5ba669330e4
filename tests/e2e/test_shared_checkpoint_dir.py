"""checkpoint.dir on per-node disks is refused before step 1, on every rank at once (issue #17): two
"nodes" on one machine, each rank a plain process (as a user's own launcher starts them), rank 1 in
its own mount namespace with a tmpfs over checkpoint.dir, its "node-local disk". Rank 0's probe is
not there for rank 1, and both ranks exit 4 with the shared-file-system message, nothing trained.
Skipped, saying why, where mount namespaces or tmpfs mounts are not allowed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, TINY_JOB, child_env, read_metrics
from fft_dist.dist import free_port
from fft_dist.exit_codes import CHECKPOINT_ERROR

pytestmark = pytest.mark.slow


def skip(reason: str):
    print(f"SKIP reason: {reason}", flush=True)
    pytest.skip(reason)


def test_a_checkpoint_dir_the_ranks_do_not_share_is_refused_before_training(tmp_path):
    if not shutil.which("unshare") or os.geteuid() != 0:
        skip("needs root and unshare(1) for a mount namespace per rank")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode:
        skip(f"cannot mount a tmpfs in a new mount namespace here: {probe.stderr.strip()}")
    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    ckpt_dir.mkdir(parents=True)  # the mount point of rank 1's own disk
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        cmd = [sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={run}", *TINY_JOB, "checkpoint.save_final=true"]
        if rank == 1:  # this "node" has its own disk at checkpoint.dir; run.dir itself is shared
            cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=16m tmpfs "$0" && exec "$@"', str(ckpt_dir), *cmd]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.communicate()
    codes = [p.returncode for p in procs]
    err = outs[0][1]
    assert codes == [CHECKPOINT_ERROR, CHECKPOINT_ERROR], f"{codes}\n{err[-3000:]}\n{outs[1][1][-3000:]}"
    assert f"checkpoint.dir {ckpt_dir} is not one folder that every rank shares" in err, err[-3000:]
    assert "shared file system" in err and "is not there after 10 s" in err, err[-3000:]
    assert "Traceback" not in err + outs[1][1], err + outs[1][1]
    assert not [r for r in read_metrics(run) if "loss" in r] if (run / "metrics.jsonl").exists() else True
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [".fft-dist.lock"], "rank 0 removes its probe"
