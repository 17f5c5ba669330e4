"""data.format=classification: rows become (tokens, class id), bad labels and columns are named before
training, the loss is per example over the whole global batch (same under fsdp / zero3 as on one
process), a causal-LM folder gets a fresh head, checkpoints keep their task, and the export loads
as AutoModelForSequenceClassification with the trained model's numbers."""
from __future__ import annotations

import json
from pathlib import Path
import datasets

import pytest
import torch
import torch.nn.functional as F

from fft_dist.checkpoint import resume_rules
from fft_dist.config import DataConfig, DataFormat
from fft_dist.data import DataError, check_data_files, collate, load_datasets
from fft_dist.errors import ConfigError
from fft_dist.loss import CLASSES, TOKENS, class_loss_sum, count_examples, objective_for
from classification_shared import tok


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, tok, path, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return load_datasets(DataConfig(path=path, format=DataFormat.classification, **kw), tok,
                         cache_dir=tmp_path / "cache")


def test_rows_become_text_tokens_and_a_class_id(tmp_path, tok):
    rows = [{"text": f"row {i} " + "word " * (i % 9), "label": [10, 2, 9][i % 3]} for i in range(12)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train_set, _, stats = load(tmp_path, tok, path, max_length=8, shuffle=False)
    assert stats.labels == ["2", "9", "10"], "inferred, sorted numerically (not as text: '10' < '2')"
    assert stats.examples == 12 and stats.loss_tokens == 12, "one unit of loss per example"
    assert stats.truncated == sum(len(tok(r["text"])["input_ids"]) > 8 for r in rows) > 0
    for row, ex in zip(rows, train_set):
        assert ex.input_ids == tok(row["text"])["input_ids"][:8]
        assert ex.labels == [stats.labels.index(str(row["label"]))]
    batch = collate(train_set[:4], tok.pad_token_id)
    assert batch["labels"][:, 0].tolist() == [2, 0, 1, 2] and (batch["labels"][:, 1:] == -100).all()
    named, _, nstats = load(tmp_path, tok, path, labels=["10", "9", "2"])
    assert nstats.labels == ["10", "9", "2"] and named[0].labels == [0], "data.labels fixes the class ids"


def test_a_label_outside_the_set_is_named_before_training(tmp_path, tok):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": "maybe"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=path, format=DataFormat.classification, labels=["neg", "pos"])
    with pytest.raises(DataError, match=r"d\.jsonl:3: column 'label': label 'maybe' is not in the label set "
                                        r"\['neg', 'pos'\]"):
        check_data_files(cfg)  # the launcher's check: before any rank starts
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet: row 3: column 'label': label 'maybe' is not in"):
        load(tmp_path, tok, str(tmp_path / "d.parquet"), labels=["neg", "pos"])
    # inferred from the training rows: an eval row with an unseen label is named too
    train_path = write_jsonl(tmp_path / "t.jsonl", rows[:2] * 3)
    eval_path = write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(DataError, match=r"e\.jsonl: row 3: .*label 'maybe' is not in the label set"):
        load(tmp_path, tok, train_path, eval_path=eval_path)


def test_a_missing_label_column_lists_expected_and_found(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "class": "x"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing column\(s\) \['label'\]; expected \['text', 'label'\], "
                                        r"found \['class', 'text'\]"):
        check_data_files(DataConfig(path=path, format=DataFormat.classification))
    datasets.Dataset.from_list([{"text": "a", "class": "x"}]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet: missing column\(s\) \['label'\]; expected \['text', 'label'\], "
                                        r"found \['class', 'text'\]"):
        check_data_files(DataConfig(path=str(tmp_path / "d.parquet"), format=DataFormat.classification))
    check_data_files(DataConfig(path=path, format=DataFormat.classification, label_key="class"))


def test_options_that_cannot_apply_are_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}] * 4)
    with pytest.raises(ConfigError, match="data.packing does not apply to data.format=classification"):
        check_data_files(DataConfig(path=path, format=DataFormat.classification, packing=True))
    with pytest.raises(ConfigError, match="data.labels applies to data.format=classification only"):
        check_data_files(DataConfig(path=path, format=DataFormat.text, labels=["x", "y"]))
    with pytest.raises(DataError, match=r"1 label\(s\) \['x'\]; a classifier needs at least 2"):
        load(tmp_path, tok, path)
    with pytest.raises(ConfigError, match="names a label twice"):
        load(tmp_path, tok, path, labels=["x", "x"])


def test_loss_is_per_example_over_the_global_batch():
    """Summing each micro batch's loss / (examples of the global batch) is the mean over the global batch."""
    torch.manual_seed(0)
    logits, classes = torch.randn(8, 5), torch.randint(0, 5, (8,))
    labels = torch.full((8, 6), -100)
    labels[:, 0] = classes
    n = count_examples({"labels": labels})
    split = sum(class_loss_sum(logits[i:i + 3], labels[i:i + 3]) / n for i in range(0, 8, 3))
    assert n == 8 and torch.allclose(split, F.cross_entropy(logits, classes))
    assert objective_for(DataFormat.classification) is CLASSES and objective_for(DataFormat.chat) is TOKENS
    assert CLASSES.eval_metrics(0.5, 3, 4) == {"eval_accuracy": 0.75} and "eval_ppl" in TOKENS.eval_metrics(0.5, 0, 1)


def test_resume_refuses_a_checkpoint_of_the_other_task():
    envelope = {"meta": {"task": "causal_lm"}, "model_config": {"model_type": "llama"}}
    problems = resume_rules.incompatibilities(envelope, model_config={"model_type": "llama", "num_labels": 5},
                                               optimizer="adamw", load_optimizer=True, task="sequence_classification")
    assert len(problems) == 1 and "holds a causal_lm model" in problems[0] and "data.format=classification" in problems[0]
    old = {"meta": {}, "model_config": {"model_type": "llama"}}  # written before tasks were recorded: a causal LM
    assert resume_rules.incompatibilities(old, model_config={"model_type": "llama"}, optimizer="adamw",
                                           load_optimizer=True) == []
    assert resume_rules.incompatibilities(old, model_config={"model_type": "llama"}, optimizer="adamw",
                                           load_optimizer=True, task="sequence_classification")


def test_data_report_shows_labels_and_the_first_example_with_its_label(tmp_path, tok):
    from fft_dist.data.report import data_report

    rows = [{"text": f"about {w} number {i}", "label": w} for i in range(10) for w in ("cats", "dogs")]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), format=DataFormat.classification,
                     eval_fraction=0.0, shuffle=False)
    text = data_report(cfg, tok, cache_dir=tmp_path / "cache")
    assert "labels (class id = position; loss: one cross-entropy per example): cats 10, dogs 10" in text
    assert "label 'cats'):\nabout cats number 0" in text
