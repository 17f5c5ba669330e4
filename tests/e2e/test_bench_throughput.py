"""bench/throughput.py keeps running: its smoke mode (1 round, 2 steps, nothing recorded) on real 2-rank jobs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, child_env


def smoke(tmp_path, *variants: str) -> list[dict]:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--smoke", "--json", str(out),
                           "--variants", *variants], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| variant |" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow  # two 2-rank jobs: ~25 s on an idle 2-core machine, ~55 s on a shared one
def test_smoke_fsdp_pair_reports_tokens_per_s_and_the_ratio(tmp_path):
    rows = {r["variant"]: r for r in smoke(tmp_path, "fft-dist fsdp", "hand fsdp2")}
    assert set(rows) == {"fft-dist fsdp", "hand fsdp2"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
    ours, loop = rows["fft-dist fsdp"], rows["hand fsdp2"]
    assert ours["base"] == "hand fsdp2"
    assert ours["ratio"] == pytest.approx(ours["tokens_per_s"] / loop["tokens_per_s"])
    assert not (REPO / "bench" / "RESULTS.md").read_text().count("--smoke")  # smoke runs are never recorded


@pytest.mark.slow
def test_smoke_every_variant(tmp_path):
    rows = smoke(tmp_path, "fft-dist none", "hand single", "fft-dist zero2", "fft-dist zero3", "hand ds2", "hand ds3",
                 "hf trainer ds3")
    names = {r["variant"] for r in rows}
    # HF Trainer needs `accelerate`, which fft-dist does not install: skipped (and said so) without it
    assert {"fft-dist none", "hand single", "fft-dist zero2", "fft-dist zero3", "hand ds2", "hand ds3"} <= names
    assert all(r["tokens_per_s"] > 0 for r in rows)
