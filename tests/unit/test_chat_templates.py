"""data.format=chat with the real chat templates of Llama 3.1/3.2, Qwen2.5, Qwen3 (thinking on and off),
Mistral, Gemma 2/3 and Phi-3 (tests/fixtures/chat_templates/, sources in its README): the loss-bearing text
of each assistant turn is its reasoning/text/tool calls plus the template's end-of-turn text, found from
one rendering of the whole conversation; rows a template refuses are skipped and counted."""
from __future__ import annotations

import json

import pytest
from chat_helpers import END_OF_TURN, FAMILY_OF, TEMPLATES, loss_runs, template, tokenizer

from fft_dist.config import DataConfig
from fft_dist.data import load_datasets
from fft_dist.data.chat_rows import conversation
from fft_dist.data.chat_spans import labelled

KWARGS = {"date_string": "26 Jul 2024"}  # Llama 3.x writes today's date otherwise
TALK = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, since 1871."}]
SYSTEM = [{"role": "system", "content": "Be brief."}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
TOOL_TALK = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
             {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"sky\": \"sunny\"}"},
             {"role": "assistant", "content": "Sunny in Paris."}]


def spans(name, messages, *, tools=None, train_on="assistant", **kwargs):
    tok = tokenizer(name)
    ids, labels = labelled(tok, template(name), messages, tools, {**KWARGS, **kwargs}, train_on)
    return loss_runs(tok, ids, labels), tok.decode(ids)


@pytest.mark.parametrize("name", sorted(FAMILY_OF))
def test_each_assistant_turn_trains_its_text_and_end_of_turn(name):
    eot = END_OF_TURN[name]
    runs, text = spans(name, TALK, enable_thinking=False)
    assert runs == [f"Paris.{eot}", f"Rome, since 1871.{eot}"], text
    assert text == tokenizer(name).apply_chat_template(TALK, chat_template=template(name), tokenize=False,
                                                        enable_thinking=False, **KWARGS)
    last, _ = spans(name, TALK, train_on="last_assistant", enable_thinking=False)
    assert last == runs[-1:]


def test_qwen3_thinking_on_and_off_and_reasoning_in_earlier_turns():
    reasoned = [TALK[0], {**TALK[1], "reasoning_content": "France: Paris."}, TALK[2],
                {**TALK[3], "reasoning_content": "Italy: Rome."}]
    on, text = spans("qwen3", reasoned)
    assert on == ["Paris.<|im_end|>\n", "<think>\nItaly: Rome.\n</think>\n\nRome, since 1871.<|im_end|>\n"]
    assert "France: Paris." not in text, "Qwen3 drops the reasoning of turns before the last user message"
    off, _ = spans("qwen3", TALK, enable_thinking=False)
    assert off == ["Paris.<|im_end|>\n", "Rome, since 1871.<|im_end|>\n"], "the empty think block is the prompt's"
    plain, _ = spans("qwen3", TALK)  # thinking on, no reasoning: the model learns to write the empty block
    assert plain[-1] == "<think>\n\n</think>\n\nRome, since 1871.<|im_end|>\n"


@pytest.mark.parametrize("name,call", [
    ("qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'),
    ("qwen3", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'),
    ("llama3.1", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'),
    ("llama3.2", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'),
])
def test_tool_calls_train_and_tool_results_do_not(name, call):
    messages, tools = conversation({"messages": json.dumps(TOOL_TALK), "tools": json.dumps([WEATHER_TOOL])},
                                   DataConfig(format="chat"))
    runs, text = spans(name, messages, tools=tools, enable_thinking=False)
    assert "get_weather" in text.split(runs[0])[0], "the tool schema is rendered into the prompt"
    assert runs[0].lstrip("\n").endswith(call) and '\\"city\\"' not in text, "arguments are encoded once"
    assert runs[1].endswith(f"Sunny in Paris.{END_OF_TURN[name]}") and "sunny" not in "".join(runs)


def test_rows_a_template_refuses_are_skipped_and_counted(tmp_path):
    # a system turn; a plain one; two user turns in a row
    rows = [{"messages": SYSTEM + TALK}, {"messages": TALK}, {"messages": TALK[:1] + TALK[2:]}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused = "the chat template refused the row: "
    alternate = refused + "Conversation roles must alternate user/assistant/user/assistant/..."
    for name, dropped in (("gemma2", {refused + "System role not supported": 1, alternate: 1}),
                          ("mistral", {alternate: 2}),
                          ("gemma3", {alternate: 1})):  # Gemma 3 folds a system turn into the first user turn
        cfg = DataConfig(path=str(path), format="chat", chat_template=str(TEMPLATES / f"{name}.jinja"),
                         eval_fraction=0.0)
        train, _, stats = load_datasets(cfg, tokenizer(name), cache_dir=tmp_path / name)
        assert len(train) == 3 - sum(dropped.values()) and stats.dropped == dropped, (name, stats.dropped)
