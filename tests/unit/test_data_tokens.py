"""Issue 19, data findings 4-7: BOS/EOS as the tokenizer adds them (data.add_bos / data.add_eos), .txt
sources by line, paragraph or document (data.sample_by), data.name from the file's stem, and the warning
for a held-out eval split that rounds to no row.

The tokenizers are built here (a Llama-3-style one whose post-processor adds BOS, a Gemma-style one with
add_bos_token): nothing downloads. The encoder is called as `datasets.map` calls it (in-process); one
load through the whole pipeline shows what a packed row gets.
"""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fft_dist.compose import typed
from fft_dist.config import DataConfig
from fft_dist.data import check_data_files, load_datasets
from fft_dist.data.encode import IGNORE_INDEX, Encoder
from fft_dist.data.formats import get_format
from fft_dist.data.report import data_report
from fft_dist.errors import ConfigError
from fft_dist.model import BUNDLED_TOKENIZER

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
WORDS = [BOS, EOS, "<unk>", *"zero one two three four five six seven eight nine ten eleven twelve".split()]
ID = {w: i for i, w in enumerate(WORDS)}


def _word_level() -> Tokenizer:
    t = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return t


def llama3_style():
    """BOS from the post-processor (what Llama 3's tokenizer.json does), no add_bos_token flag."""
    t = _word_level()
    t.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                     special_tokens=[(BOS, ID[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token=BOS, eos_token=EOS, unk_token="<unk>")


def gemma_style():
    """BOS from the tokenizer's add_bos_token setting (Gemma's tokenizer_config.json)."""
    return PreTrainedTokenizerFast(tokenizer_object=_word_level(), bos_token=BOS, eos_token=EOS, unk_token="<unk>",
                                   add_bos_token=True)


@pytest.fixture(scope="module")
def bundled():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


def encode(tok, fmt: str, rows: dict, **kw) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each output row, exactly as the pipeline's map gets them."""
    cfg = DataConfig(path="x.jsonl", format=fmt, **kw)
    enc = Encoder(cfg, tok, lambda i: f"row {i + 1}", fmt=get_format(fmt))
    out = enc(rows, list(range(len(next(iter(rows.values()))))))
    return list(zip(out["input_ids"], out["labels"]))


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


@pytest.mark.parametrize("make", [llama3_style, gemma_style], ids=["llama3-post-processor", "gemma-add_bos_token"])
def test_auto_puts_the_tokenizers_own_bos_first_once_and_eos_last(make):
    tok = make()
    [(got, labels)] = encode(tok, "text", {"text": ["one two three"]})
    assert got == ids(f"{BOS} one two three {EOS}")
    assert labels == [IGNORE_INDEX] + ids(f"one two three {EOS}")  # BOS is context; the first word is now predicted
    [(got, labels)] = encode(tok, "prompt_completion", {"prompt": ["one two"], "completion": ["three"]})
    assert got == ids(f"{BOS} one two three {EOS}") and labels == [IGNORE_INDEX] * 3 + ids(f"three {EOS}")
    # text that already starts with BOS gets no second one; add_bos=false and add_eos=false drop them
    [(got, _)] = encode(tok, "text", {"text": [f"{BOS} one two"]})
    assert got == ids(f"{BOS} one two {EOS}")
    [(got, _)] = encode(tok, "text", {"text": ["one two"]}, add_bos="false", add_eos="false")
    assert got == ids("one two")


def test_a_tokenizer_without_bos_gets_none_unless_asked(bundled):
    plain = bundled("one two", add_special_tokens=False)["input_ids"]
    [(got, _)] = encode(bundled, "text", {"text": ["one two"]})
    assert got == plain + [bundled.eos_token_id]  # unchanged from before issue 19: no BOS, EOS appended
    [(got, _)] = encode(bundled, "text", {"text": ["one two"]}, add_bos="true")
    assert got == [bundled.bos_token_id] + plain + [bundled.eos_token_id]
    no_bos = PreTrainedTokenizerFast(tokenizer_object=_word_level(), eos_token=EOS, unk_token="<unk>")
    with pytest.raises(ConfigError, match="data.add_bos=true, but the tokenizer has no BOS token"):
        encode(no_bos, "text", {"text": ["one"]}, add_bos="true")


def test_every_stride_window_starts_with_bos_and_each_token_is_trained_once():
    doc = " ".join(WORDS[3:15])  # 12 words, + EOS = 13 tokens
    rows = encode(llama3_style(), "text", {"text": [doc]}, max_length=6, stride=3)
    assert len(rows) > 2
    trained = []
    for got, labels in rows:
        assert len(got) <= 6 and got[0] == ID[BOS] and got.count(ID[BOS]) == 1 and labels[0] == IGNORE_INDEX
        trained += [t for t in labels[1:] if t != IGNORE_INDEX]
    assert trained == ids(doc) + [ID[EOS]]
    assert encode(llama3_style(), "text", {"text": [f"{BOS} {doc}"]}, max_length=6, stride=3) == rows  # BOS written


def test_packed_rows_keep_one_bos_per_example_and_the_report_shows_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one two", "three four five", "six")))
    cfg = DataConfig(path=str(path), format="text", packing=True, max_length=16, eval_fraction=0.0)
    train, _, _ = load_datasets(cfg, llama3_style(), cache_dir=tmp_path / "cache")
    row = train[0]
    starts = [i for i, p in enumerate(row.position_ids) if p == 0]
    assert [row.input_ids[i] for i in starts] == [ID[BOS]] * 3 and row.input_ids.count(ID[BOS]) == 3
    report = data_report(DataConfig(path=str(path), format="text", eval_fraction=0.0), llama3_style(),
                         cache_dir=tmp_path / "cache")
    assert f"special tokens: {BOS} before each example (data.add_bos=auto)" in report
    example = report.split("first training example", 1)[1].splitlines()[1]
    assert example.startswith(BOS) and example.count(BOS) == 1, example


def test_txt_files_are_read_by_line_paragraph_or_document(tmp_path, bundled, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Alpha one.\nAlpha two.\n\nBeta one.\n\n\nGamma.\n")
    (docs / "b.txt").write_text("Delta, a whole file\nin two lines.\n")
    glob = str(docs / "*.txt")
    rows = {}
    for sample_by in ("line", "paragraph", "document"):
        cfg = DataConfig(path=glob, format="text", sample_by=sample_by, eval_fraction=0.0)
        check_data_files(cfg)
        train, _, stats = load_datasets(cfg, bundled, cache_dir=tmp_path / "cache")
        rows[sample_by] = stats.rows
        texts = [bundled.decode(train[i].input_ids, skip_special_tokens=True) for i in range(len(train))]
        if sample_by == "paragraph":
            assert texts[0] == "Alpha one.\nAlpha two." and "Beta one." in texts
        if sample_by == "document":
            assert texts == ["Alpha one.\nAlpha two.\n\nBeta one.\n\n\nGamma.\n", "Delta, a whole file\nin two lines.\n"]
    assert rows == {"line": 9, "paragraph": 4, "document": 2}  # blank lines are rows (then dropped) by line
    assert cfg.name == "docs"  # a glob's data is named after its folder
    # a long document is cut into stride windows as before
    cfg = DataConfig(path=glob, format="text", sample_by="document", max_length=4, stride=2, eval_fraction=0.0)
    _, _, stats = load_datasets(cfg, bundled, cache_dir=tmp_path / "cache")
    assert stats.windowed > 2
    for bad, message in ((dict(sample_by="page"), "data.sample_by='page' must be one of line, paragraph, document"),
                         (dict(path=str(tmp_path / "x.jsonl"), sample_by="document"), "reads .txt files"),
                         (dict(format="prompt_completion", sample_by="document"),
                          "data.sample_by applies to data.format=text only"),
                         (dict(add_eos="maybe"), "data.add_eos='maybe' must be one of auto, true, false")):
        (tmp_path / "x.jsonl").write_text(json.dumps({"text": "a", "prompt": "a", "completion": "b"}) + "\n")
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
            check_data_files(DataConfig(**{"path": glob, "format": "text", **bad}))


def test_the_name_is_the_files_stem_and_a_small_set_warns_that_it_has_no_eval_split(tmp_path, capsys):
    assert typed([])[0].data.name == "stdlib_docstrings"  # the shipped default keeps its name
    small = tmp_path / "my_set.jsonl"
    small.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(10)))
    cfg = typed([f"data.path={small}"])[0].data
    assert cfg.name == "my_set" and typed([f"data.path={small}", "data.name=mine"])[0].data.name == "mine"
    check_data_files(cfg)
    err = capsys.readouterr().err
    assert ("warning: data.path has 10 row(s) and data.eval_fraction=0.05 holds out none, so there is no eval split"
            in err and "set data.eval_path=<file> or data.eval_fraction=0.1 or more" in err), err
    for quiet in (DataConfig(path=str(small), eval_fraction=0.0), DataConfig(path=str(small), eval_fraction=0.1)):
        check_data_files(quiet)
        assert "warning" not in capsys.readouterr().err
