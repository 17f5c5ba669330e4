"""data.format=chat reads rows as users have them: OpenAI messages with tool calls (arguments as JSON text
or objects, tools of any shape), ShareGPT, Alpaca, any layout through data.role_key/content_key/roles;
parquet rows whose missing keys came back as nulls; data.train_on; templates with {% generation %}."""
from __future__ import annotations

import json

import datasets
import pytest
from chat_helpers import TEMPLATES, loss_runs, tokenizer

from fft_dist.config import DataConfig
from fft_dist.data import DataError, check_data_files, load_datasets
from fft_dist.errors import ConfigError

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, path, **kw):
    kw.setdefault("chat_template", CHATML)
    cfg = DataConfig(path=path, format="chat", eval_fraction=0.0, **kw)
    check_data_files(cfg)  # the pre-launch check reads the same layouts
    train, _, stats = load_datasets(cfg, tokenizer("qwen2.5"), cache_dir=tmp_path / "cache")
    return train, stats


def runs(example):
    return loss_runs(tokenizer("qwen2.5"), example.input_ids, example.labels)


def test_sharegpt_rows_are_read_as_they_are(tmp_path):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Weather?"},
                             {"from": "gpt", "value": "Let me look."}, {"from": "tool", "value": "sunny"},
                             {"from": "gpt", "value": "Sunny."}]}
    train, _ = load(tmp_path, write_jsonl(tmp_path / "s.jsonl", [row]))
    assert runs(train[0]) == ["Hello!<|im_end|>\n", "Let me look.<|im_end|>\n", "Sunny.<|im_end|>\n"]
    last, _ = load(tmp_path / "last", write_jsonl(tmp_path / "s.jsonl", [row]), train_on="last_assistant")
    assert runs(last[0]) == ["Sunny.<|im_end|>\n"]
    every, _ = load(tmp_path / "all", write_jsonl(tmp_path / "s.jsonl", [row]), train_on="all")
    assert every[0].labels == every[0].input_ids


def test_any_layout_through_role_and_content_keys(tmp_path):
    rows = [{"dialog": [{"speaker": "person", "text": "Hi"}, {"speaker": "bot", "text": "Hello!"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl:1: message 0 has no 'from'"):
        load(tmp_path, path, messages_key="dialog")
    with pytest.raises(DataError, match=r"unknown role 'person'.*data.roles"):
        load(tmp_path, path, messages_key="dialog", role_key="speaker", content_key="text")
    train, _ = load(tmp_path, path, messages_key="dialog", role_key="speaker", content_key="text",
                    roles={"person": "user", "bot": "assistant"})
    assert runs(train[0]) == ["Hello!<|im_end|>\n"]


def test_alpaca_rows_keep_their_input(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
            {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."}]
    train, _ = load(tmp_path, write_jsonl(tmp_path / "a.jsonl", rows))
    tok = tokenizer("qwen2.5")
    assert tok.decode(train[0].input_ids) == ("<|im_start|>user\nTranslate to French.\n\ncheese<|im_end|>\n"
                                              "<|im_start|>assistant\nfromage<|im_end|>\n")
    assert tok.decode(train[1].input_ids).startswith(
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nSay hi.<")
    assert [runs(e) for e in train] == [["fromage<|im_end|>\n"], ["hi<|im_end|>\n"]]


TOOLS_A = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}}]
TOOLS_B = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


def tool_row(tools, name, arguments, result, answer):
    return {"tools": tools, "messages": [
        {"role": "user", "content": "Please help."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "name": name, "content": result},
        {"role": "assistant", "content": answer}]}


def test_tool_rows_of_every_shape_load_and_train_their_calls(tmp_path):
    rows = [tool_row(TOOLS_A, "weather", '{"city": "Paris"}', "sunny", "Sunny."),  # OpenAI: arguments as JSON text
            tool_row(TOOLS_B, "add", {"a": 2, "b": 3}, "5", "It is 5."),  # arguments as an object
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]  # no tools
    train, stats = load(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows),
                        chat_template=str(TEMPLATES / "qwen2.5.jinja"), max_length=1024)
    tok = tokenizer("qwen2.5")
    assert stats.examples == 3 and not stats.dropped
    text = tok.decode(train[1].input_ids)
    assert '"required": ["a", "b"]' in text and '{"name": "add", "arguments": {"a": 2, "b": 3}}' in text
    assert runs(train[0])[0].endswith('<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
                                      '</tool_call><|im_end|>\n')
    assert "sunny" not in "".join(runs(train[0])) and runs(train[0])[1] == "Sunny.<|im_end|>\n"


def test_parquet_rows_with_null_filled_keys_render_like_json_rows(tmp_path):
    rows = [tool_row(TOOLS_A, "weather", '{"city": "Paris"}', "sunny", "Sunny."),
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))  # Arrow fills absent keys with null
    template = str(TEMPLATES / "llama3.1.jinja")  # tests `'tool_calls' in message`: a null key must be gone
    kwargs = {"date_string": "26 Jul 2024"}
    cfg = dict(chat_template=template, chat_template_kwargs=kwargs, max_length=1024)
    from_parquet, _ = load(tmp_path / "p", str(tmp_path / "t.parquet"), **cfg)
    from_json, _ = load(tmp_path / "j", write_jsonl(tmp_path / "t.jsonl", rows), **cfg)
    assert [e.input_ids for e in from_parquet] == [e.input_ids for e in from_json]
    assert [e.labels for e in from_parquet] == [e.labels for e in from_json]


def test_templates_with_generation_blocks_use_their_own_marks(tmp_path):
    marked = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content }}<|im_end|>{% endgeneration %}\n{% else %}{{ m.content }}<|im_end|>\n{% endif %}"
              "{% endfor %}")
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    train, _ = load(tmp_path, path, chat_template=marked)
    assert runs(train[0]) == ["Hello!<|im_end|>", "Bye!<|im_end|>"]
    last, _ = load(tmp_path / "last", path, chat_template=marked, train_on="last_assistant")
    assert runs(last[0]) == ["Bye!<|im_end|>"]


@pytest.mark.parametrize("override,needle", [
    ({"train_on": "everything"}, "data.train_on='everything' is not one of assistant, last_assistant, all"),
    ({"roles": {"bot": "robot"}}, "data.roles={'bot': 'robot'}"),
])
def test_bad_chat_options_are_refused_before_launch(tmp_path, override, needle):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        check_data_files(DataConfig(path=path, format="chat", **override))
    with pytest.raises(ConfigError, match="applies to data.format=chat only"):
        check_data_files(DataConfig(path=path, **override))


def test_unread_columns_are_reported(tmp_path):
    from fft_dist.data.report import unread_lines

    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "instruction": "Add.", "input": "2 3", "output": "5"}])
    lines = unread_lines(DataConfig(path=alpaca, prompt_key="instruction", completion_key="output"))
    assert lines[0] == "not read by data.format=prompt_completion: column(s) input (they never reach the model)"
    assert "data.format=chat reads instruction/input/output" in lines[1]
    assert unread_lines(DataConfig(path=alpaca, format="chat")) == [], "chat reads every Alpaca column"


def test_the_readme_rows_load_as_documented(tmp_path):
    import re

    from helpers import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Your data"):readme.index("## One example per launcher")]
    rows = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]
    for k, row in enumerate(rows):
        train, stats = load(tmp_path / str(k), write_jsonl(tmp_path / f"r{k}.jsonl", [row]),
                            chat_template=str(TEMPLATES / "qwen2.5.jinja"), max_length=1024)
        assert len(train) == 1 and not stats.dropped
        assert len(runs(train[0])) == (2 if "tools" in row else 1), "the tool call, then the answer"


def test_sharegpt_function_calls_become_tool_calls(tmp_path):
    row = {"tools": json.dumps(TOOLS_B), "conversations": [
        {"from": "human", "value": "2 + 3?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
        {"from": "observation", "value": "5"}, {"from": "gpt", "value": "It is 5."}]}
    train, _ = load(tmp_path, write_jsonl(tmp_path / "f.jsonl", [row]), chat_template=str(TEMPLATES / "qwen2.5.jinja"),
                    max_length=1024)
    assert runs(train[0]) == ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n',
                              "It is 5.<|im_end|>\n"]
