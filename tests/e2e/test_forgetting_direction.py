"""The direction of L2-SP (issue 20), end to end, as bench/forgetting.py measures it at a larger scale: a tiny
Llama trained on code (the shipped docstring -> body pairs) and exported, then fine-tuned on prose
(tests/fixtures/forgetting/general.txt) twice from the same seed, with loss.l2sp.weight=0 and =100; the held-out
code set (eval.sets) must rise less with the pull toward the base than without it. Nothing is hard-coded: both
rises come from the runs' `forgetting` records."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, TINY_MODEL, child_env, read_metrics, train

GENERAL = REPO / "tests" / "fixtures" / "forgetting" / "general.txt"
CODE = REPO / "fft_dist" / "assets" / "stdlib_docstrings.jsonl"
JOB = ["parallelism=none", "launcher.nproc_per_node=1", "data.max_length=64", "train.global_batch_size=8",
       "train.micro_batch_size=8", "train.warmup_steps=2", "eval.every_steps=0", "train.seed=0"]


@pytest.mark.slow
def test_a_larger_l2sp_weight_forgets_less_of_the_base(tmp_path):
    rows = CODE.read_text(encoding="utf-8").splitlines()
    (tmp_path / "code_train.jsonl").write_text("\n".join(rows[:400]) + "\n")
    short = [r for r in rows[400:] if len(json.loads(r)["prompt"]) < 120]  # the body fits in 64 tokens
    (tmp_path / "code_heldout.jsonl").write_text("\n".join(short[-48:]) + "\n")
    base = tmp_path / "base"
    train(base, *TINY_MODEL, *JOB, f"data.path={tmp_path / 'code_train.jsonl'}", "data.eval_fraction=0.05",
          "train.max_steps=40", "train.lr=3e-3", "checkpoint.export_final=true", nproc=1, parallelism="none")

    def fine_tune(weight: float) -> subprocess.Popen:
        args = [sys.executable, "-m", "fft_dist.cli", "train", *JOB, f"run.dir={tmp_path / f'ft{weight:g}'}",
                f"model.path={base / 'hf'}", "model.tokenizer=bundled", f"data.path={GENERAL}", "data.format=text",
                f"data.eval_path={GENERAL}", f"+eval.sets.code.path={tmp_path / 'code_heldout.jsonl'}",
                "+eval.sets.code.format=prompt_completion", "train.max_steps=12", "train.lr=3e-3",
                f"loss.l2sp.weight={weight}", "checkpoint.save_final=false"]
        return subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    procs = {w: fine_tune(w) for w in (0.0, 100.0)}  # both at once: two processes on the two cores
    rise = {}
    for w, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        records = read_metrics(tmp_path / f"ft{w:g}")
        (report,) = [r for r in records if r.get("event") == "forgetting"]
        rise[w] = report["eval_code_loss_change"]
        if w:
            assert any(r.get("l2sp_loss", 0) > 0 for r in records), "the pull was never applied"
    print(json.dumps(rise))
    assert rise[0.0] > 0, f"plain fine-tuning on prose did not raise the code loss at all: {rise}"
    assert rise[100.0] < rise[0.0], f"L2-SP did not reduce the rise of the held-out code loss: {rise}"
