"""eval.sets and eval.select (issue 20), in process: the selection picks another step than the task loss alone
would; the refusals (a weight, an unknown select key, ...) are ConfigErrors before launch. Real runs:
tests/e2e/test_forgetting_report.py."""
from __future__ import annotations

import pytest

from helpers import REPO
from fft_dist.compose import compose, resolve, to_typed
from fft_dist.config import ConfigError
from fft_dist.evaluation import track
from fft_dist.trainer import TrainState
from fft_dist.validate import validate

GENERAL = REPO / "tests" / "fixtures" / "forgetting" / "general.txt"
SETS = [f"+eval.sets.general.path={GENERAL}", "+eval.sets.general.format=text"]


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


def test_held_out_sets_need_a_task_eval_split():
    """Held-out sets are evaluated beside the task's eval split; without one they would silently never run."""
    with pytest.raises(ConfigError, match=r"eval.sets.general: held-out sets are evaluated beside the task's eval"):
        validate(typed("data.eval_fraction=0", *SETS), 2)


def test_a_held_out_set_whose_first_row_has_no_loss_tokens_loads(tmp_path):
    """Every row of a held-out set is an eval row; a first row whose prompt outlasts data.max_length (no loss
    tokens) is dropped from it like any other such row, not taken for an empty training split."""
    import json

    from fft_dist.evaluation import held_out_sets
    from fft_dist.model import load_tokenizer

    rows = [{"prompt": "x " * 400, "completion": " y"}] + [{"prompt": f"def f{i}():", "completion": " pass"}
                                                           for i in range(5)]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = typed("data.max_length=64")
    sets = held_out_sets({"code": {"path": str(path), "format": "prompt_completion"}}, cfg.data,
                         load_tokenizer(cfg.model), cache_dir=tmp_path / "cache")
    assert [s.name for s in sets] == ["code"] and len(sets[0].split) == 5
