"""Peak RSS per rank of real `fft-dist train` runs agrees with the estimate within 25%, once the
framework's baseline on CPU is allowed for. bench/memory.py measures that allowance (see its
docstring): the same job with a ~37k-parameter model, less that model's estimate (~480 MB a rank)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, child_env


def run_bench(tmp_path, *args: str, env: dict | None = None) -> list[dict]:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--no-record", "--json", str(out),
                           *args], cwd=REPO, env=child_env(**(env or {})), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def check(rows: list[dict]) -> None:
    bad = [f"{r['backend']} x{r['ranks']}: measured/predicted {r['ratio']:.2f}" for r in rows
           if not 0.75 <= r["ratio"] <= 1.25]
    assert not bad, bad
    for r in rows:
        assert len(r["peak_rss"]) == r["ranks"]


@pytest.mark.slow
def test_tiny_model_peak_rss_matches_the_estimate_plus_baseline(tmp_path):
    rows = run_bench(tmp_path, "--model", "tiny", "--worlds", "1", "2", "--steps", "2")
    assert {(r["backend"], r["ranks"]) for r in rows} == {("none", 1), ("fsdp", 1), ("zero2", 1), ("zero3", 1),
                                                          ("fsdp", 2), ("zero2", 2), ("zero3", 2)}
    check(rows)


# glibc keeps freed memory in its heap: with its defaults, what the ~48M model's setup and steps free
# (ZeRO-3's setup; FSDP's gathered parameters, unsharded gradients, activations) stays in peak RSS,
# 43-76% above the estimate plus baseline at fsdp x2 / x4 and zero3 (bench/RESULTS.md, 2026-12-01). With
# large allocations on mmap (returned when freed; CPU-FACTS.md, "Measuring memory") the peaks are the
# live ones: 0.94 (fsdp x2), 1.19 / 1.18 (zero3 x1 / x2) measured.
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@pytest.mark.slow
@pytest.mark.parametrize("backend,world", [("none", 1), ("fsdp", 2), ("zero3", 2)])
def test_50m_model_peak_rss_matches_the_estimate_plus_baseline(tmp_path, backend, world):
    rows = run_bench(tmp_path, "--model", "50m", "--worlds", str(world), "--backends", backend, "--steps", "2",
                     env=RETURN_FREED)
    check(rows)
