"""Data loading errors name the file and line; the sampler is deterministic and world-size independent."""
from __future__ import annotations

import json

import pytest

from fft_dist.config import DataConfig, DataFormat
from fft_dist.data import DataError, GlobalBatchSampler, collate, load_datasets
from fft_dist.data.examples import IGNORE_INDEX
from fft_dist.model import BUNDLED_TOKENIZER
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_json_names_file_and_line(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, '{"prompt": "a", "completion": ',
                                     {"prompt": "c", "completion": "d"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        load_datasets(DataConfig(path=str(f)), tok)


def test_missing_column_lists_expected_and_found(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing column\(s\) \['completion'\].*found \['answer', 'prompt'\]"):
        load_datasets(DataConfig(path=str(f)), tok)


def test_empty_dataset_rejected(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [])
    with pytest.raises(DataError, match="empty"):
        load_datasets(DataConfig(path=str(f)), tok)


def test_prompt_tokens_carry_no_loss(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [{"prompt": "def f(x):", "completion": " return x"}] * 4)
    train, _, _ = load_datasets(DataConfig(path=str(f), eval_fraction=0.0), tok)
    ex = train[0]
    n_prompt = len(tok("def f(x):", add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id


def test_rows_without_loss_after_truncation_are_dropped_and_counted(tmp_path, tok):
    long_prompt = "word " * 200
    f = write(tmp_path / "d.jsonl", [{"prompt": long_prompt, "completion": "x"}, {"prompt": "a", "completion": "b c"}])
    train, _, stats = load_datasets(DataConfig(path=str(f), eval_fraction=0.0, max_length=16), tok)
    assert len(train) == 1 and stats.dropped_no_loss == 1 and stats.truncated == 1


def test_text_format_trains_every_token(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [{"text": "hello world"}] * 3)
    train, _, _ = load_datasets(DataConfig(path=str(f), eval_fraction=0.0, format=DataFormat.text), tok)
    assert train[0].labels == train[0].input_ids


def test_sampler_same_global_batch_for_any_split():
    s = GlobalBatchSampler(100, 8, seed=3)
    for step in (0, 5, 12, 13):  # 12 steps per epoch: 12 and 13 are in epoch 1
        whole = s.global_batch(step)
        assert len(set(whole)) == 8
        for world, micro in ((1, 8), (2, 2), (4, 1), (2, 4)):
            parts = [i for r in range(world)
                     for mb in s.rank_micro_batches(step, rank=r, world_size=world, micro_batch_size=micro) for i in mb]
            assert parts == whole
    assert s.global_batch(0) != s.global_batch(12), "each epoch reshuffles"
    assert GlobalBatchSampler(100, 8, seed=3).global_batch(13) == s.global_batch(13), "a fresh sampler resumes exactly"


def test_sampler_rejects_too_small_dataset():
    with pytest.raises(DataError, match="needs 16"):
        GlobalBatchSampler(10, 16, seed=0)


def test_collate_pads_right_and_masks_labels():
    from fft_dist.data import Example

    b = collate([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])], pad_id=9)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_bundled_corpus_is_real_and_loads(tok):
    from fft_dist.config import ASSETS_DIR

    cfg = DataConfig(path=str(ASSETS_DIR / "stdlib_docstrings.jsonl"))
    train, evals, _ = load_datasets(cfg, tok)
    assert len(train) > 1000 and len(evals) > 50
    lengths = {len(e.input_ids) for e in train[:200]}
    assert len(lengths) > 20, "rows must have unequal lengths"
