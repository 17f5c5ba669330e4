"""`fft_dist.memory` and `fft-dist estimate` (issue 11): the formulas, the seeds' worked 7B example,
DeepSpeed's own estimators where they overlap, and the command's output (the console script in a child
process: no ranks).

The comparison with per-rank bytes measured on real processes is tests/e2e/test_memory_measured.py.
"""
from __future__ import annotations

import json

from helpers import fft_dist


def test_cli_estimate_json_and_table():
    """The real console entry point: one JSON list with the documented names; the table marks fits."""
    proc = fft_dist("estimate", "model=llama3_8b", "data.max_length=2048", "train.micro_batch_size=1",
                    "--gpus", "1,8", "--gpu-mem", "80GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 6 + 5
    for r in rows:
        assert {"parallelism", "gpus", "params", "per_gpu_bytes", "fits"} <= set(r)
        assert {"params", "grads", "optimizer", "activations", "total"} <= set(r["per_gpu_bytes"])
        assert r["params"] == 8_030_261_248
    by = {(r["parallelism"], r["gpus"]): r for r in rows}
    assert by[("none", 1)]["fits"] is False and by[("fsdp", 8)]["fits"] is True
    assert by[("fsdp", 8)]["per_gpu_bytes"]["total"] < by[("zero2", 8)]["per_gpu_bytes"]["total"]
