"""Local sources through `datasets` (every file type, globs, lists, save_to_disk folders), offline
refusal of hub names, and the tokenise-once cache keyed by sources, tokenizer and settings."""
from __future__ import annotations

import json

import datasets
import pytest
from transformers import AutoTokenizer

from fft_dist.config import DataConfig, DataFormat
from fft_dist.data import DataError, check_data_files, load_datasets
from fft_dist.model import BUNDLED_TOKENIZER

ROWS = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x * {i} + {i % 7}\n"} for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


def tokens(split) -> list:
    return [(e.input_ids, e.labels) for e in split]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path, tok, tmp_path, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return load_datasets(DataConfig(path=path, **kw), tok, cache_dir=tmp_path / "cache")


def test_every_file_type_gives_the_same_tokens(tmp_path, tok):
    ds = datasets.Dataset.from_list(ROWS)
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "folder"))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    reference = tokens(load(str(tmp_path / "d.jsonl"), tok, tmp_path)[0])
    assert len(reference) == len(ROWS)
    for name in ("d.parquet", "d.csv", "folder", "d.json"):
        check_data_files(DataConfig(path=str(tmp_path / name)))
        assert tokens(load(str(tmp_path / name), tok, tmp_path)[0]) == reference, name
    arrow = next((tmp_path / "folder").glob("*.arrow"))
    assert tokens(load(str(arrow), tok, tmp_path)[0]) == reference, "a bare .arrow file"


def test_glob_and_list_concatenate_in_order(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:25])
    write_jsonl(tmp_path / "b.jsonl", ROWS[25:])
    write_jsonl(tmp_path / "all.jsonl", ROWS)
    whole = tokens(load(str(tmp_path / "all.jsonl"), tok, tmp_path)[0])
    assert tokens(load(str(tmp_path / "[ab].jsonl"), tok, tmp_path)[0]) == whole
    assert tokens(load([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], tok, tmp_path)[0]) == whole


def test_text_files_are_one_row_per_line(tmp_path, tok):
    (tmp_path / "d.txt").write_text("first line of text\nsecond one\n\nthird\n")
    train, _, stats = load(str(tmp_path / "d.txt"), tok, tmp_path, format=DataFormat.text)
    assert stats.rows == 4 and len(train) == 3, "the empty line has no loss tokens and is dropped"
    assert tok.decode(train[0].input_ids[:-1]) == "first line of text"


def test_eval_from_files_or_a_fixed_held_out_fraction(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "eval.jsonl", ROWS[:3])
    train, evals, _ = load(str(tmp_path / "train.jsonl"), tok, tmp_path, eval_path=str(tmp_path / "eval.jsonl"))
    assert len(train) == 40 and len(evals) == 3
    train, evals, _ = load(str(tmp_path / "train.jsonl"), tok, tmp_path, eval_fraction=0.25)
    assert len(train) == 30 and len(evals) == 10
    again = load(str(tmp_path / "train.jsonl"), tok, tmp_path / "other", eval_fraction=0.25)[1]
    assert tokens(evals) == tokens(again), "the held-out split depends on nothing but the data"
    assert not set(map(str, tokens(evals))) & set(map(str, tokens(train)))


def test_hub_name_is_refused_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"not available offline; download it .* point data.path at the files"):
        check_data_files(DataConfig(path="tatsu-lab/alpaca"))


@pytest.mark.parametrize("make,needle", [
    (lambda p: str(p / "nothing*.jsonl"), "matches no file"),
    (lambda p: [str(p / "ok.jsonl"), str(p / "gone.jsonl")], "gone.jsonl' does not exist"),
    (lambda p: str(p / "d.xlsx"), "unknown file type '.xlsx'"),
    (lambda p: str(p / "bad.parquet"), "bad.parquet: missing column(s) ['completion']; expected ['prompt', 'completion']"),
    (lambda p: str(p / "bad.csv"), "bad.csv: missing column(s) ['completion']"),
])
def test_bad_sources_name_the_file(tmp_path, make, needle):
    write_jsonl(tmp_path / "ok.jsonl", ROWS[:2])
    (tmp_path / "d.xlsx").write_text("x")
    datasets.Dataset.from_list([{"prompt": "a"}]).to_parquet(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.csv").write_text("prompt,answer\na,b\n")
    with pytest.raises(DataError) as e:
        check_data_files(DataConfig(path=make(tmp_path)))
    assert needle in str(e.value)


def test_empty_parquet_is_an_error(tmp_path, tok):
    datasets.Dataset.from_list(ROWS).select([]).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(DataError, match="empty"):
        check_data_files(DataConfig(path=str(tmp_path / "e.parquet")))


def test_training_rows_are_memory_mapped_arrow(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, _, stats = load(str(tmp_path / "d.jsonl"), tok, tmp_path)
    files = [f["filename"] for f in train.dataset.cache_files]
    assert files and all(f.startswith(str(tmp_path / "cache")) for f in files), files
    assert stats.cache.startswith(str(tmp_path / "cache"))


def test_cache_is_reused_and_rebuilt_when_tokens_would_change(tmp_path, tok):
    data = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    cache = tmp_path / "cache"

    def run(t=tok, **kw):
        return load_datasets(DataConfig(path=data, eval_fraction=0.1, **kw), t, cache_dir=cache)[2]

    first = run()
    assert not first.reused
    again = run(shuffle=False, num_proc=2)  # settings that do not change the tokens
    assert again.reused and again.cache == first.cache
    shorter = run(max_length=8)
    assert not shorter.reused and shorter.cache != first.cache and shorter.truncated > 0
    tok.save_pretrained(tmp_path / "tok")
    other = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    other.add_tokens(["return x"])
    changed = run(other)
    assert not changed.reused and changed.cache not in (first.cache, shorter.cache)
    write_jsonl(tmp_path / "d.jsonl", ROWS[:-1])  # the source file changed
    edited = run()
    assert not edited.reused and edited.rows == 35
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 4
