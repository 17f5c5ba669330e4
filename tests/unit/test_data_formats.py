"""data.format: text with sliding windows, prompt_completion columns, chat (loss on assistant turns only,
templates from a string or a .jinja file), tokenized rows; bad rows are named, empty loss masks dropped."""
from __future__ import annotations

import re
import datasets

import pytest

from fft_dist.config import DataConfig, DataFormat
from fft_dist.data import DataError, check_data_files
from fft_dist.data.encode import IGNORE_INDEX, sliding_windows
from fft_dist.errors import ConfigError
from data_formats_shared import TEMPLATE, load, tok, write_jsonl


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, since 1871."}]


def labelled_runs(example) -> list[list[int]]:
    """The maximal runs of loss-bearing tokens (positions >= 1)."""
    runs, current = [], []
    for t in example.labels[1:]:
        if t == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("length,stride", [(32, 24), (32, 1), (32, 32), (16, 5)])
def test_sliding_windows_train_each_token_once(length, stride):
    ids = list(range(1000, 1100))
    trained = []
    windows = list(sliding_windows(ids, length, stride))
    for k, (w_ids, w_labels) in enumerate(windows):
        assert w_ids == ids[k * stride : k * stride + length] and len(w_labels) == len(w_ids)
        trained += [t for t in w_labels[1:] if t != IGNORE_INDEX]  # position 0 is never predicted
    lost = {ids[k * stride] for k in range(1, len(windows))} if stride == length else set()
    assert sorted(trained) == sorted(set(ids[1:]) - lost), "every token once, the overlap only as context"
    assert windows[-1][0][-1] == ids[-1]


def test_text_stride_windows_long_documents(tmp_path, tok):
    doc = " ".join(f"word{i}" for i in range(120))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": doc}, {"text": "short one"}])
    train, _, stats = load(tmp_path, tok, path, format=DataFormat.text, max_length=32, stride=16)
    n = len(tok(doc, add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert stats.windowed == len(train) - 1 > 1 and stats.truncated == 0
    m = len(tok("short one", add_special_tokens=False)["input_ids"]) + 1
    assert sum(e.loss_tokens for e in train) == (n - 1) + (m - 1), "each document token trained once"
    truncated, _, tstats = load(tmp_path, tok, path, format=DataFormat.text, max_length=32)
    assert len(truncated) == 2 and tstats.truncated == 1 and tstats.windowed == 0


def test_stride_is_refused_where_it_means_nothing(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ConfigError, match="data.stride applies to data.format=text only"):
        check_data_files(DataConfig(path=path, stride=8))
    with pytest.raises(ConfigError, match=r"data.stride=300 must be in \[0, data.max_length=256\]"):
        check_data_files(DataConfig(path=path, format=DataFormat.text, text_key="prompt", stride=300))


def test_a_column_option_the_format_does_not_read_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ConfigError, match=r"data.text_key='body': data.format=prompt_completion does not read this "
                                          r"column \(it reads data.prompt_key, data.completion_key\)"):
        check_data_files(DataConfig(path=path, text_key="body"))
    with pytest.raises(ConfigError, match=r"data.label_key='y'.*data.format=text"):
        check_data_files(DataConfig(path=path, format=DataFormat.text, text_key="prompt", label_key="y"))
    check_data_files(DataConfig(path=path, format=DataFormat.text, text_key="prompt"))  # the one it reads: fine


def test_prompt_completion_columns_are_configurable(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2=", "answer": " 4"}] * 3)
    train, _, _ = load(tmp_path, tok, path, prompt_key="question", completion_key="answer")
    assert labelled_runs(train[0]) == [tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


@pytest.mark.parametrize("from_file", [False, True])
def test_chat_loss_falls_on_assistant_turns_only(tmp_path, tok, from_file):
    template = TEMPLATE
    if from_file:
        (tmp_path / "t.jinja").write_text(TEMPLATE)
        template = str(tmp_path / "t.jinja")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}] * 2)
    train, _, stats = load(tmp_path, tok, path, format=DataFormat.chat, chat_template=template)
    ex = train[0]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CHAT, chat_template=TEMPLATE, tokenize=False)
    assert [tok.decode(run) for run in labelled_runs(ex)] == ["Paris.</s>\n", "Rome, since 1871.</s>\n"]
    assert stats.loss_tokens == 2 * ex.loss_tokens


def test_chat_truncation_drops_rows_without_assistant_tokens(tmp_path, tok):
    long = [{"role": "user", "content": "tell me " * 60}, {"role": "assistant", "content": "no"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": long}])
    fits = len(tok(tok.apply_chat_template(CHAT, chat_template=TEMPLATE, tokenize=False))["input_ids"])
    train, _, stats = load(tmp_path, tok, path, format=DataFormat.chat, chat_template=TEMPLATE, max_length=fits)
    assert len(train) == 1 and stats.dropped == {"no loss tokens left after truncation": 1}
    assert stats.truncated == 1


def test_chat_without_a_template_names_the_option(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(ConfigError, match="data.chat_template"):
        load(tmp_path, tok, path, format=DataFormat.chat)


@pytest.mark.parametrize("messages,needle", [
    ([{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'wizard'"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
])
def test_bad_chat_rows_are_named(tmp_path, tok, messages, needle):
    rows = [{"messages": CHAT}, {"messages": CHAT}, {"messages": messages}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=rf"c\.jsonl:3: .*{needle}"):
        check_data_files(DataConfig(path=path, format=DataFormat.chat))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(DataError, match=rf"c\.parquet: row 3: .*{needle}"):
        load(tmp_path, tok, str(tmp_path / "c.parquet"), format=DataFormat.chat, chat_template=TEMPLATE)


def test_tokenized_rows_are_used_as_they_are(tmp_path, tok):
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
            {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 0, 1]}, {"input_ids": [5, 6], "loss_mask": [1, 0]}]
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(tmp_path / "plain.parquet"))
    train, _, stats = load(tmp_path, tok, str(tmp_path / "plain.parquet"), format=DataFormat.tokenized)
    assert train[0].input_ids == train[0].labels == [5, 6, 7, 8]
    path = write_jsonl(tmp_path / "t.jsonl", rows[1:])
    train, _, stats = load(tmp_path, tok, path, format=DataFormat.tokenized)
    assert [e.labels for e in train] == [[-100, -100, 7, 8], [-100, -100, -100, 8]]
    assert stats.dropped == {"no loss tokens": 1}, "a mask on position 0 only trains nothing"


@pytest.mark.parametrize("row,needle", [
    ({"input_ids": [5, 6], "labels": [5]}, "labels has a different length"),
    ({"input_ids": [5, 999999]}, "input_ids must be a non-empty list of token ids in"),
])
def test_bad_tokenized_rows_are_named(tmp_path, tok, row, needle):
    path = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 2]}, row])
    with pytest.raises(DataError, match=rf"t\.jsonl: row 2: {re.escape(needle)}"):
        load(tmp_path, tok, path, format=DataFormat.tokenized)
