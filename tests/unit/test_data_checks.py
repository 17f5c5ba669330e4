"""Data problems that used to surface as a traceback (or a message without its line) after launch
are refused before launch with exit 2, naming the file, the line or column, and the fix (issue #15,
item 17): columns of the wrong type (parquet, arrow, save_to_disk; CSV is text), non-UTF-8 .txt
lines, a missing chat template file; and a bad JSONL line past the pre-launch check's reach stops
the cache build with exit 2 naming it."""
from __future__ import annotations

import json
import datasets

import pytest
from transformers import AutoTokenizer

from fft_dist import cli
from fft_dist.config import ConfigError, DataConfig, DataFormat
from fft_dist.data import DataError, check_data_files, load_datasets
from fft_dist.model import BUNDLED_TOKENIZER
from launch_checks import dry, dry_ok
from data_checks_shared import BAD_LINE, long_jsonl


ROWS = {"prompt": [str(i) for i in range(20)], "completion": [f" = {i * 2}" for i in range(20)]}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


def refused_by_cli(*overrides: str, expect: tuple[str, ...]) -> None:
    """Both ways in: `fft-dist launch ... launcher.dry_run=true` and `fft-dist data` (in-process)."""
    proc = dry(*overrides)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for text in expect:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr}"


def test_columns_of_the_wrong_type_are_refused_from_the_schema(tmp_path, capsys):
    ints = datasets.Dataset.from_dict({**ROWS, "prompt": list(range(20))})
    ints.to_parquet(str(tmp_path / "d.parquet"))
    ints.save_to_disk(str(tmp_path / "folder"))
    arrow = next((tmp_path / "folder").glob("*.arrow"))
    for path in (tmp_path / "d.parquet", tmp_path / "folder", arrow):
        with pytest.raises(DataError) as e:
            check_data_files(DataConfig(path=str(path)))
        assert str(e.value).startswith(f"{path}: column 'prompt' is int64") and "a string" in str(e.value), e.value
    refused_by_cli(f"data.path={tmp_path / 'd.parquet'}", expect=(f"{tmp_path / 'd.parquet'}: column 'prompt' is int64",))
    assert cli.data([f"data.path={tmp_path / 'd.parquet'}"]) == 2
    assert "column 'prompt' is int64" in capsys.readouterr().err
    # the right types pass; a tokenized set needs a list column
    datasets.Dataset.from_dict(ROWS).to_parquet(str(tmp_path / "ok.parquet"))
    check_data_files(DataConfig(path=str(tmp_path / "ok.parquet")))
    datasets.Dataset.from_dict({"input_ids": ["1 2 3"] * 3}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match="column 'input_ids' is string, but data.format=tokenized reads it as a list"):
        check_data_files(DataConfig(path=str(tmp_path / "t.parquet"), format=DataFormat.tokenized))


def test_a_csv_file_is_text_so_a_column_of_digits_trains_as_the_text_it_holds(tmp_path, tok):
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"{p},{c}\n" for p, c in zip(*ROWS.values())))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                              for p, c in zip(*ROWS.values())))
    check_data_files(DataConfig(path=str(tmp_path / "d.csv")))
    splits = [load_datasets(DataConfig(path=str(tmp_path / name), eval_fraction=0.0), tok,
                            cache_dir=tmp_path / "cache")[0] for name in ("d.csv", "d.jsonl")]
    assert [e.input_ids for e in splits[0]] == [e.input_ids for e in splits[1]] and len(splits[0]) == 20
    with pytest.raises(DataError, match="column 'input_ids' is string"):  # CSV cannot hold token lists
        (tmp_path / "t.csv").write_text("input_ids\n1 2 3\n")
        check_data_files(DataConfig(path=str(tmp_path / "t.csv"), format=DataFormat.tokenized))


def test_a_non_utf8_txt_line_is_named_by_file_and_line(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_bytes(b"first line\nsecond line\nthird \xff\xfe line\nfourth\n")
    cfg = DataConfig(path=str(path), format=DataFormat.text)
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8 text \(byte 7 of the line\)$"):
        check_data_files(cfg)
    refused_by_cli(f"data.path={path}", "data.format=text", expect=(f"{path}:3: not UTF-8",))
    # the same line, found by the rank that builds the cache (a line past the pre-launch check's reach)
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8"):
        load_datasets(DataConfig(path=str(path), format=DataFormat.text, eval_fraction=0.0), tok,
                      cache_dir=tmp_path / "cache")


def test_a_missing_chat_template_file_is_refused_before_launch(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    base = [f"data.path={chat}", "data.format=chat"]
    for value in ("./chatml.jinja", "templates/chatml.j2", "chatml"):  # a file name, or no Jinja at all
        refused_by_cli(*base, f"data.chat_template={value}", expect=(f"data.chat_template={value!r}", "not a file"))
    (tmp_path / "chatml.j2").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    dry_ok(*base, f"data.chat_template={tmp_path / 'chatml.j2'}")
    dry_ok(*base, "data.chat_template='{% for m in messages %}{{ m.content }}{% endfor %}'")
    with pytest.raises(ConfigError, match="data.mixture.a.chat_template"):  # a mixture entry names itself
        check_data_files(DataConfig(path=None, mixture={"a": {"path": str(chat), "weight": 1.0, "format": "chat",
                                                              "chat_template": "missing.jinja"}}))


def test_a_bad_jsonl_line_past_the_pre_launch_check_stops_the_cache_build_naming_it(long_jsonl, tmp_path, tok):
    cfg = DataConfig(path=str(long_jsonl), max_examples=8)
    check_data_files(cfg)  # the pre-launch check reads PRECHECK_LINES lines: the bad one is past them
    with pytest.raises(DataError, match=rf"^{long_jsonl}:{BAD_LINE}: malformed JSON"):
        load_datasets(cfg, tok, cache_dir=tmp_path / "cache")
