"""data.format: text with sliding windows, prompt_completion columns, chat (loss on assistant turns only,
templates from a string or a .jinja file), tokenized rows; bad rows are named, empty loss masks dropped."""
from __future__ import annotations

import datasets

import pytest

from data_formats_shared import TEMPLATE, load, tok, write_jsonl


def test_two_tokenising_processes_give_the_same_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i} " * (i % 9), "completion": f"c{i}"} for i in range(64)])
    one = load(tmp_path / "a", tok, path)[0]
    two = load(tmp_path / "b", tok, path, num_proc=2)[0]
    assert [(e.input_ids, e.labels) for e in one] == [(e.input_ids, e.labels) for e in two]


def _chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]


def test_chat_trains_on_two_ranks_from_one_cache(tmp_path):
    from helpers import TINY_JOB, step_records, train

    datasets.Dataset.from_list(_chat_rows(48)).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    args = (*TINY_JOB, f"data.path={tmp_path / 'c.parquet'}", "data.format=chat", f"data.chat_template={tmp_path / 't.jinja'}",
            "train.max_steps=3")
    proc = train(tmp_path / "run", *args)
    caches = [p for p in (tmp_path / "run" / "data_cache").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1 and "tokenised in" in proc.stdout
    assert len(step_records(tmp_path / "run")) == 3


@pytest.mark.slow
def test_a_bad_row_found_while_tokenising_stops_every_rank_once(tmp_path):
    from helpers import TINY_JOB, train

    rows = _chat_rows(20)
    rows[2] = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    proc = train(tmp_path / "run", *TINY_JOB, f"data.path={tmp_path / 'c.parquet'}", "data.format=chat",
                 f"data.chat_template={tmp_path / 't.jinja'}", "data.eval_fraction=0", expect_rc=2, timeout=240)
    assert f"{tmp_path / 'c.parquet'}: row 3: message 0 has unknown role 'wizard'" in proc.stderr
    assert proc.stderr.count("data error") == 1 and "Traceback" not in proc.stderr
