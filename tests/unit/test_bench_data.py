"""bench/data.py in a small mode (so it cannot rot), and the sampler fix it led to: a rank's
memory must not grow with the data set, and the shuffled order must stay what checkpoints expect."""
from __future__ import annotations

import pytest
import torch


def test_sampler_order_is_the_shuffled_permutation_checkpoints_expect():
    from fft_dist.data import GlobalBatchSampler

    s = GlobalBatchSampler(1000, 8, seed=3)
    for step in (0, 7, 124, 125):  # 125 steps per epoch: 125 starts epoch 1
        epoch, pos = divmod(step, 125)
        order = torch.randperm(1000, generator=torch.Generator().manual_seed(3 * 100_003 + epoch)).tolist()
        batch = s.global_batch(step)
        assert batch == order[pos * 8 : pos * 8 + 8] and all(type(i) is int for i in batch)
    assert GlobalBatchSampler(1000, 8, seed=0, shuffle=False).global_batch(3) == list(range(24, 32))


def test_sampler_memory_does_not_hold_a_python_list_per_row():
    """1M rows: the permutation as int64 is 8 MB; as a Python list it was ~40 MB more on every rank."""
    from fft_dist.data import GlobalBatchSampler

    before = rss_mb()
    s = GlobalBatchSampler(1_000_000, 8, seed=0)
    s.global_batch(0)
    s.global_batch(1)
    grew = rss_mb() - before  # the sampler is alive here: its permutation is resident
    assert grew < 24, f"a 1M-row sampler holds {grew:.0f} MB"


def rss_mb() -> float:
    """Resident memory now (not the peak, which earlier tests in the session may have set)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")
