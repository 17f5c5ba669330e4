"""Every rank runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set the
allocator's config (issue 17): set when the rank joins its process group, before its first CUDA
allocation."""
from __future__ import annotations

import torch

from fft_dist.dist import default_cuda_alloc_conf


def test_ranks_get_expandable_segments_unless_the_user_set_it(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    env: dict[str, str] = {}
    default_cuda_alloc_conf(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for mine in ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}):
        env = dict(mine)
        default_cuda_alloc_conf(env)
        assert env == mine
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build: nothing to set
    env = {}
    default_cuda_alloc_conf(env)
    assert env == {}
