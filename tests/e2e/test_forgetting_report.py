"""eval.sets and eval.select (issue 20) end to end on 2 ranks (fsdp, gloo, the tiny Llama): a shipped general-text
file (tests/fixtures/forgetting/) is evaluated at step 0 and at each evaluation as eval_general_loss, kept out of
eval_loss, with its change since step 0 in every record; the end of the run writes a `forgetting` record and prints
the loss before and after; a set named like a mixture source exits 2 before launch. In process:
tests/unit/test_forgetting_report.py."""
from __future__ import annotations

import pytest

from helpers import REPO, TINY_JOB, fft_dist, read_metrics, train

GENERAL = REPO / "tests" / "fixtures" / "forgetting" / "general.txt"
SETS = [f"+eval.sets.general.path={GENERAL}", "+eval.sets.general.format=text"]


def test_held_out_set_is_reported_before_during_and_after(tmp_path):
    run = tmp_path / "run"
    proc = train(run, *TINY_JOB, "train.max_steps=4", "eval.every_steps=2", *SETS,
                 "+eval.select.task=1.0", "+eval.select.general=0.5")
    records = read_metrics(run)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    first = evals[0]["eval_general_loss"]
    for r in evals:
        assert r["eval_general_loss_change"] == pytest.approx(r["eval_general_loss"] - first)
        assert r["eval_select_loss"] == pytest.approx((r["eval_loss"] + 0.5 * r["eval_general_loss"]) / 1.5)
        assert r["eval_general_loss"] != r["eval_loss"]  # a set of its own, not part of the task loss
    assert evals[-1]["eval_best_loss"] == min(r["eval_select_loss"] for r in evals)
    (report,) = [r for r in records if r.get("event") == "forgetting"]
    after = evals[-1]["eval_general_loss"]
    assert report["eval_general_loss_before"] == first and report["eval_general_loss_after"] == after
    assert report["eval_general_loss_change"] == pytest.approx(after - first)
    assert f"held-out general: loss {first:.4f} -> {after:.4f}" in proc.stdout, proc.stdout[-2000:]


def test_a_name_shared_with_a_mixture_source_exits_2_before_launch(tmp_path):
    proc = fft_dist("train", f"run.dir={tmp_path / 'r'}", "data=stdlib_mixture", "+eval.sets.text.path=x.txt",
                    timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "eval.sets.text" in proc.stderr and "Traceback" not in proc.stderr
