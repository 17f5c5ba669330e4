"""bench/data.py in a small mode (so it cannot rot), and the sampler fix it led to: a rank's
memory must not grow with the data set, and the shuffled order must stay what checkpoints expect."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
