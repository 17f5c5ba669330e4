"""Every rank runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set the
allocator's config (issue 17): set when the rank joins its process group, before its first CUDA
allocation."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, child_env


@pytest.mark.parametrize("preset", [None, "max_split_size_mb:64"])
def test_init_distributed_sets_it_before_cuda(preset):
    """The rank's own process group set-up is where it happens (every launcher's ranks pass through it)."""
    code = ("import os, torch; torch.version.cuda = '12.6'\n"
            "from fft_dist.dist import init_distributed, destroy\n"
            "assert 'PYTORCH_CUDA_ALLOC_CONF' not in os.environ or os.environ['PYTORCH_CUDA_ALLOC_CONF'] == 'max_split_size_mb:64'\n"
            "init_distributed('gloo'); print(os.environ['PYTORCH_CUDA_ALLOC_CONF']); destroy()\n")
    env = child_env()
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    env.pop("PYTORCH_ALLOC_CONF", None)
    if preset:
        env["PYTORCH_CUDA_ALLOC_CONF"] = preset
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == (preset or "expandable_segments:True")
