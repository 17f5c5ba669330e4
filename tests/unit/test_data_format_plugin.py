"""The data format as an extension point: the built-ins and a toy format from tests/support/plugins go through the
one registry (fft_dist.data.formats.register_format), and the toy one trains on two real ranks."""
from __future__ import annotations

import sys

import pytest
from transformers import AutoTokenizer

from fft_dist.config import DataConfig, DataFormat
from fft_dist.data import DataError, check_data_files, load_datasets
from fft_dist.data.examples import IGNORE_INDEX
from fft_dist.data.formats import Format, get_format, register_format, registered_formats
from fft_dist.errors import ConfigError
from fft_dist.loss import CLASSES, TOKENS, objective_for
from fft_dist.model import BUNDLED_TOKENIZER
from data_format_plugin_shared import PLUGINS, ROWS, write


sys.path.insert(0, str(PLUGINS))
import toy_format  # noqa: E402 - registers data.format=toy_qa


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


def test_the_built_in_formats_are_registered_through_the_same_point():
    assert {f.value for f in DataFormat} <= set(registered_formats())
    assert "toy_qa" in registered_formats()
    assert objective_for("classification") is CLASSES and objective_for("toy_qa") is TOKENS
    assert get_format(DataFormat.text) is get_format("text")  # the enum names the same formats
    with pytest.raises(ConfigError, match=r"data.format='nope' is not a data format; registered: .*toy_qa.*loss.plugins"):
        check_data_files(DataConfig(format="nope"))
    mixture = {"a": {"path": "x.jsonl", "weight": 1.0, "format": "nope"}}
    with pytest.raises(ConfigError, match=r"data.mixture.a.format='nope' is not a data format"):
        check_data_files(DataConfig(path=None, mixture=mixture))
    with pytest.raises(ValueError, match="registered twice"):
        register_format(Format("toy_qa", lambda *a: None))
    with pytest.raises(ValueError, match="not data.\\* options"):
        register_format(Format("bad_option", lambda *a: None, columns={"question_key": str}))


def test_the_toy_format_encodes_a_prompt_and_trains_on_the_answer(tmp_path, tok):
    path = write(tmp_path / "qa.jsonl", ROWS[:3])
    train, _, stats = load_datasets(DataConfig(path=path, format="toy_qa", eval_fraction=0.0), tok)
    assert stats.rows == 3 and len(train) == 3
    for row, ex in zip(ROWS, train):
        context = tok(toy_format.prompt(row["q"]), add_special_tokens=False)["input_ids"]
        answer = tok(row["a"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex.input_ids == context + answer
        assert ex.labels == [IGNORE_INDEX] * len(context) + answer


def test_the_toy_formats_columns_are_checked_before_launch(tmp_path):
    path = write(tmp_path / "qa.jsonl", [ROWS[0], {"q": "only a question"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: missing column\(s\) \['a'\]; expected \['q', 'a'\]"):
        check_data_files(DataConfig(path=path, format="toy_qa"))
    with pytest.raises(ConfigError, match=r"data.text_key='body': data.format=toy_qa does not read this column "
                                          r"\(it reads q, a\)"):
        check_data_files(DataConfig(path=write(tmp_path / "ok.jsonl", ROWS), format="toy_qa", text_key="body"))
    with pytest.raises(ConfigError, match="data.stride applies to data.format=text only"):
        check_data_files(DataConfig(path=write(tmp_path / "ok.jsonl", ROWS), format="toy_qa", stride=8))
