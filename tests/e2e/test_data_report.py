"""`fft-dist data`: the report without training, through the real console entry point."""
from __future__ import annotations

import json

from helpers import fft_dist


def test_report_on_the_embedded_default_trains_nothing(tmp_path):
    proc = fft_dist("data", f"run.dir={tmp_path / 'run'}", "data.inspect_terms=[getcontext,Zyxwvutsrqponm]",
                    timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("train: 2906 examples from 2995 rows", "eval:  155 examples from 158 rows",
                   "token lengths (train examples):", "truncated to data.max_length=256:",
                   "no loss tokens left after truncation: 89 train", "loss-bearing tokens:",
                   "first training example", "[[    try:", "'getcontext'", "warning: 'Zyxwvutsrqponm' splits into"):
        assert needle in out, needle
    assert "warning: 'getcontext'" not in out
    assert not (tmp_path / "run").exists(), "the report writes no run directory"


def test_report_reuses_a_named_cache_and_reports_bad_data(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " * (i + 1)}) + "\n" for i in range(30)))
    args = ("data", f"data.path={data}", "data.format=text", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=16", "data.stride=8")
    first, second = fft_dist(*args, timeout=180), fft_dist(*args, timeout=180)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "(built now)" in first.stdout and "(reused)" in second.stdout
    assert "windowed (data.stride=8): 0 train windows" not in first.stdout
    data.write_text('{"text": "fine"}\n{"text": \n')
    bad = fft_dist(*args, timeout=180)
    assert bad.returncode == 2 and f"{data}:2: malformed JSON" in bad.stderr and "Traceback" not in bad.stderr
