"""Options the chosen launcher does not use are refused (exit 2, naming the option) before anything runs."""
from __future__ import annotations

import pytest

from launch_checks import dry


@pytest.mark.parametrize("overrides,message", [
    (["launcher=local", "launcher.max_restarts=1"], "launcher.max_restarts=1"),
    (["launcher=torchrun", "launcher.image=x"], "launcher.image is not an option of launcher=torchrun"),
    (["launcher=deepspeed", "parallelism=zero2", "launcher.nodes=2"], "launcher.nodes=2"),
    (["launcher=slurm", "launcher.rdzv_endpoint=a:1"], "launcher.rdzv_endpoint is not an option of launcher=slurm"),
    (["launcher=container", "launcher.image=i", "launcher.shm_size=8g"], "launcher.shm_size"),
    (["launcher=container"], "launcher.image"),
    (["launcher=torchrun", "launcher.nnodes=2"], "launcher.rdzv_endpoint"),
    (["launcher=torchrun", "launcher.nnodes=2", "launcher.node_rank=1", "launcher.rdzv_endpoint=a:1"], "run.dir"),
])
def test_options_the_launcher_does_not_use_are_refused(overrides, message):
    proc = dry(*overrides)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
