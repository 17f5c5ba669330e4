"""Device-correct collectives (issue #17): under NCCL only CUDA tensors have a backend, so a CPU tensor
(the RNG state FSDP's rank-0 build broadcasts) crashed the first GPU run. Every tensor collective goes
through fft_dist/dist.py's helpers, which put the tensor on the device the group serves.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from helpers import REPO, child_env


def test_the_collective_device_follows_the_groups_backend_on_a_cuda_only_group():
    """torch lets a CPU machine make a group whose only backend serves CUDA ("cuda:gloo"): there a CPU
    tensor is refused exactly as under NCCL, and the helpers pick CUDA as the collective device."""
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from fft_dist.dist import collective_device
        dist.init_process_group(backend="cuda:gloo")
        try:
            dist.broadcast(torch.zeros(2), src=0)
            print("cpu tensor accepted")
        except RuntimeError as e:
            print("cpu tensor refused:", e)
        print("collective device:", collective_device().type)
        dist.destroy_process_group()
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
        print("gloo collective device:", collective_device().type)
    """)
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpu tensor refused: No backend type associated with device type cpu" in proc.stdout, proc.stdout
    assert "collective device: cuda" in proc.stdout and "gloo collective device: cpu" in proc.stdout
