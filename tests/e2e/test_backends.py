"""The backend registry (fft_dist.strategy.backend): every backend is one descriptor; parallelism=hsdp's
checks and sizing come from its own; and a backend defined under tests/ registers through the same point
and runs once, end to end (tests/support/toy_backend.py + tests/support/toy_conf/parallelism/toy.yaml)."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO, TINY_JOB, child_env, train_losses, SUPPORT


def test_invalid_shard_size_is_exit_2_before_launch(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", "train", f"run.dir={tmp_path}/run", "parallelism=hsdp",
                           "parallelism.shard_size=3", "launcher.nproc_per_node=4", *TINY_JOB, "train.micro_batch_size=1"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "parallelism.shard_size=3 does not divide the world size 4" in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


TOY_RUN = """
import sys
sys.path.insert(0, {tests!r})
import toy_backend  # registers parallelism=toy
from fft_dist.cli import main
main(sys.argv[1:])
"""


def test_a_backend_from_outside_the_package_runs_end_to_end(tmp_path):
    """tests/support/toy_backend.py registers `toy`; its yaml comes through --config-dir; one in-process rank trains."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", TOY_RUN.format(tests=str(SUPPORT)), "train",
                           "--config-dir", str(SUPPORT / "toy_conf"), "parallelism=toy", f"run.dir={run}",
                           "launcher.nproc_per_node=1", *TINY_JOB, "train.max_steps=2", "checkpoint.save_final=true"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "toy backend: set up" in proc.stderr
    assert len(train_losses(run)) == 2
    assert '"backend": "toy"' in (run / "checkpoints" / "step-0000002" / "train_state.json").read_text()
