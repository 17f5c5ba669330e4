"""data.mixture: weighted sources. Proportions hold per batch, each source reshuffles per its own
epoch, each source's eval set is reported by name, bad mixtures stop before any rank starts, and a
resume mid-epoch (with packing on) gives the uninterrupted run's next batches at any world size."""
from __future__ import annotations

import pytest

from helpers import TINY_JOB, assert_close_rel, fft_dist, read_metrics, step_records, train
from data_mixture_shared import code_rows, prose_rows


@pytest.mark.parametrize("override, message", [
    ("data.mixture.txet.weight=0.2", "Key 'txet' is not in struct"),
    ("+data.mixture.txet.weight=0.2", "data.mixture.txet sets a weight but no source of that name exists"),
    ("data.mixture.text.weight=0", "data.mixture.text.weight=0 must be a finite number > 0"),
    ("data.mixture.text.path=/nowhere/general.jsonl", "data.mixture.text.path='/nowhere/general.jsonl' does not exist"),
])
def test_bad_mixture_stops_before_any_rank_starts(tmp_path, override, message):
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", "data=stdlib_mixture", override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "starting" not in proc.stdout + proc.stderr, "no rank may start"


@pytest.mark.slow
def test_mixture_with_packing_resumes_exactly_and_reports_each_source(tmp_path):
    """A packed two-source run saved at step 3 continues with the uninterrupted run's steps 4-6 (2 ranks
    bit-identical, 1 rank to 1e-5); every evaluation reports eval_<name>_loss and their weighted mean."""
    code, prose = code_rows(tmp_path / "code.jsonl", 200), prose_rows(tmp_path / "prose.jsonl", 150)
    job = (*TINY_JOB, "data.path=null", "data.packing=true", f"data.cache_dir={tmp_path / 'cache'}",
           f"+data.mixture.code.path={code}", "+data.mixture.code.weight=0.75",
           f"+data.mixture.prose.path={prose}", "+data.mixture.prose.weight=0.25", "+data.mixture.prose.format=text",
           "train.max_steps=6", "checkpoint.every_steps=3", "eval.every_steps=3")
    train(tmp_path / "full", *job)
    full = {r["step"]: r["loss"] for r in step_records(tmp_path / "full")}
    assert len(full) == 6 and full[4] != full[5]
    evals = [r for r in read_metrics(tmp_path / "full") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert r["eval_loss"] == pytest.approx(0.75 * r["eval_code_loss"] + 0.25 * r["eval_prose_loss"], rel=1e-12)
        assert r["eval_code_loss"] != r["eval_prose_loss"]
    step3 = tmp_path / "full" / "checkpoints" / "step-0000003"
    proc = train(tmp_path / "same", *job, f"resume={step3}")
    assert "eval loss" in proc.stdout and "| code " in proc.stdout, "the printed line names each source"
    same = {r["step"]: r["loss"] for r in step_records(tmp_path / "same")}
    assert [same[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)], "bit-identical at the same world size"
    train(tmp_path / "one", *job, f"resume={step3}", nproc=1, parallelism="none")
    one = {r["step"]: r["loss"] for r in step_records(tmp_path / "one")}
    assert_close_rel([one[s] for s in (4, 5, 6)], [full[s] for s in (4, 5, 6)], 1e-5, "resumed on 1 rank")
