"""eval.sets and eval.select (issue 20): held-out sets evaluated but never trained on, a forgetting report.

End to end on 2 ranks (fsdp, gloo, the tiny Llama): a shipped general-text file (tests/fixtures/forgetting/)
is evaluated at step 0 and at each evaluation as eval_general_loss, kept out of eval_loss, with its change
since step 0 in every record; the end of the run writes a `forgetting` record and prints the loss before and
after; eval.select weighs task and general loss into the loss that picks the best. In process: the
selection picks another step than the task loss alone would; the refusals (a name that is also a
mixture source, a weight, an unknown select key) exit 2 before launch."""
from __future__ import annotations

import pytest

from helpers import REPO, TINY_JOB, fft_dist, read_metrics, train
from fft_dist.compose import compose, resolve, to_typed
from fft_dist.config import ConfigError
from fft_dist.evaluation import track
from fft_dist.trainer import TrainState
from fft_dist.validate import validate

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


def test_select_weighs_task_and_general_loss_into_the_best():
    alone, weighted = TrainState(), TrainState()
    history = [(0, 3.0, 2.0), (1, 2.5, 2.9), (2, 2.6, 2.2)]  # the task loss is lowest at 1, the mix at 2
    for step, task, general in history:
        losses = {"eval_loss": task, "eval_general_loss": general}
        track(alone, losses, step, patience=0, held_out=["general"])
        record, _ = track(weighted, losses, step, patience=0, select={"task": 1.0, "general": 1.0},
                          held_out=["general"])
    assert alone.best_step == 1 and weighted.best_step == 2
    assert record["eval_select_loss"] == pytest.approx(2.4) and weighted.held_out_first == {"general": 2.0}


def typed(*overrides: str):
    return to_typed(resolve(compose(list(overrides))))


@pytest.mark.parametrize("overrides,message", [
    (["data=stdlib_mixture", "+eval.sets.text.path=x.txt"], "eval.sets.text: data.mixture.text trains on"),
    (["+eval.sets.general.path=x.txt", "+eval.sets.general.weight=0.1"], "eval.sets.general.weight: a held-out"),
    (["+eval.sets.task.path=x.txt"], "eval.sets.task: a set name must be"),
    (["+eval.sets.general.path=x.txt", "+eval.select.web=1.0"], "eval.select.web: not 'task' or an eval.sets name"),
    (["+eval.select.task=0"], "eval.select: the weights add up to 0"),
])
def test_bad_sets_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(typed(*overrides), 2)
    assert message in str(e.value)


def test_a_name_shared_with_a_mixture_source_exits_2_before_launch(tmp_path):
    proc = fft_dist("train", f"run.dir={tmp_path / 'r'}", "data=stdlib_mixture", "+eval.sets.text.path=x.txt",
                    timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "eval.sets.text" in proc.stderr and "Traceback" not in proc.stderr
