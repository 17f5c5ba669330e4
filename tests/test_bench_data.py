"""bench/data.py in a small mode (so it cannot rot), and the sampler fix it led to: a rank's
memory must not grow with the data set, and the shuffled order must stay what checkpoints expect."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env


@pytest.mark.slow
def test_data_bench_small_run_reports_every_field(tmp_path):
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "data.py"), "--rows", "2000", "--small", "500",
                           "--steps", "2", "--no-record", "--json", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    disk = res["disk"]
    assert disk["rows"] == 2000 and disk["bytes"] > 2000 * 100
    assert all(disk[k] > 0 for k in ("write_s", "read_s", "parse_s"))
    pre = res["preprocess"]
    assert [(p["rows"], p["num_proc"]) for p in pre] == [(500, 1), (2000, 1), (2000, 2)]
    for p in pre:
        assert 0 < p["examples"] <= p["rows"] and p["examples"] + p["dropped"] == p["rows"]
        assert p["tokens"] > 10 * p["examples"] and p["rows_per_s"] > 0 and p["peak_rss_mb"] > 100
    assert pre[1]["examples"] == pre[2]["examples"] and pre[1]["tokens"] == pre[2]["tokens"], "num_proc changed tokens"
    for size, rows in (("small", 500), ("large", 2000)):
        t = res["train"][size]
        assert t["rows"] == rows
        for mode in ("cli", "ranks"):
            assert t[mode]["steps"] == 2
            assert 1 < t[mode]["first_step_s"] <= t[mode]["wall_s"]
        assert len(t["ranks"]["peak_rss_mb"]) == 2 and min(t["ranks"]["peak_rss_mb"]) > 100
        assert len(t["ranks"]["peak_anon_mb"]) == 2 and 50 < min(t["ranks"]["peak_anon_mb"])
        assert max(t["ranks"]["peak_anon_mb"]) <= max(t["ranks"]["peak_rss_mb"])
    assert res["rss_ratio"] == max(res["rss_ratios"]) and 0.8 < res["rss_ratio"] < 1.1
    assert len(res["load_average"]) == 2 and 0.8 < res["anon_ratio"] < 1.1
    for field in ("preprocess (s)", "rows/s", "launch to first step, `fft-dist train` (s)", "peak RSS per rank (MB)",
                  "Disk baseline (2000 rows", "| 2000 | 2 |", "Peak RSS per rank, 2000 rows / 500 rows"):
        assert field in proc.stdout, field


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

