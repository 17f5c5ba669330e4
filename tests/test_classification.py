"""data.format=classification: rows become (tokens, class id), bad labels and columns are named before
training, the loss is per example over the whole global batch (same under fsdp / zero3 as on one
process), a causal-LM folder gets a fresh head, checkpoints keep their task, and the export loads
as AutoModelForSequenceClassification with the trained model's numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from doc_pages import block_after
from helpers import TINY_MODEL, assert_close_rel, child_env, read_metrics, train, train_losses
from transformers import AutoTokenizer

from fft_dist.checkpoint import resume_rules
from fft_dist.config import DataConfig, DataFormat
from fft_dist.data import DataError, check_data_files, collate, load_datasets
from fft_dist.errors import ConfigError
from fft_dist.loss import CLASSES, TOKENS, class_loss_sum, count_examples, objective_for
from fft_dist.model import BUNDLED_TOKENIZER

CLASSIFY = ["data=stdlib_families", "data.max_length=48", "eval.max_batches=0", "checkpoint.save_final=false",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=0", "eval.every_steps=0"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER), local_files_only=True)


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


def readme_example() -> str:
    """The classification example of docs/data.md (README.md and docs/*.md are searched)."""
    return block_after("**Classification**")


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> Path:
    """The README's classification example, verbatim (fft-dist -> this checkout's entry point), in a temp folder."""
    cwd = tmp_path_factory.mktemp("readme")
    script = readme_example().replace("fft-dist ", f"{sys.executable} -m fft_dist.cli ")
    script = script.replace("python -c", f"{sys.executable} -c")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{script}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
    labels = ["concurrency", "files", "mail", "network", "numbers"]
    assert proc.stdout.strip().splitlines()[-1] in labels, "the snippet prints a label name"
    return cwd / "runs" / "families"


@pytest.mark.slow
def test_readme_example_trains_and_the_export_gives_the_trained_numbers(readme_run):
    """The export, loaded by AutoModelForSequenceClassification, gives the run's final eval loss and accuracy."""
    from transformers import AutoModelForSequenceClassification

    from fft_dist.compose import load_yaml

    final = [r for r in read_metrics(readme_run) if "eval_accuracy" in r][-1]
    first = [r for r in read_metrics(readme_run) if "eval_accuracy" in r][0]
    assert final["step"] == 60 and final["eval_loss"] < first["eval_loss"], "it learns"
    cfg = load_yaml(readme_run / "config.yaml")
    model = AutoModelForSequenceClassification.from_pretrained(str(readme_run / "hf")).eval()
    assert model.config.id2label == dict(enumerate(cfg.data.labels))
    tok = AutoTokenizer.from_pretrained(str(readme_run / "hf"))
    _, evals, _ = load_datasets(cfg.data, tok, cache_dir=readme_run / "data_cache")
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(evals), 8):
            batch = collate(evals[i:i + 8], tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(class_loss_sum(logits, batch["labels"]))
            correct += CLASSES.correct(logits, batch)
    assert abs(total / len(evals) - final["eval_loss"]) < 1e-5 * final["eval_loss"], (total / len(evals), final)
    assert correct / len(evals) == final["eval_accuracy"]


@pytest.mark.slow
def test_a_classifier_checkpoint_resumes_as_a_classifier_only(readme_run, tmp_path):
    ckpt = readme_run / "checkpoints" / "latest"
    proc = train(tmp_path / "lm", f"resume={ckpt}", nproc=1, parallelism="none", expect_rc=4)
    assert "task: the checkpoint holds a sequence_classification model" in proc.stderr + proc.stdout
    train(tmp_path / "cls", "data=stdlib_families", f"resume={ckpt}", "train.max_steps=62", "eval.every_steps=0",
          nproc=1, parallelism="none")
    assert [r["step"] for r in read_metrics(tmp_path / "cls") if "loss" in r] == [61, 62]


@pytest.mark.slow
def test_causal_lm_folder_gets_a_fresh_head_the_same_on_every_backend(tmp_path):
    """model.path = a causal LM: the backbone is loaded, the head starts fresh with a warning, and the
    per-example loss of fsdp x 2 (accumulating) and zero3 x 2 equals one process's to 1e-5."""
    from fft_dist.checkpoint.hf_source import FreshHead
    from fft_dist.compose import compose, resolve, to_typed
    from fft_dist.model import SEQUENCE_CLASSIFICATION, build_model, for_task, hf_config

    cfg = to_typed(resolve(compose(TINY_MODEL)))
    torch.manual_seed(7)
    lm = build_model(hf_config(cfg.model))
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    lm.save_pretrained(tmp_path / "lm")
    job = (*CLASSIFY, f"model.path={tmp_path / 'lm'}", "model.tokenizer=bundled", "train.max_steps=4")
    ref = train(tmp_path / "none", *job, "eval.every_steps=4", nproc=1, parallelism="none")
    assert "has no score.weight: a new task head, initialised fresh" in ref.stdout + ref.stderr

    # step 0 evaluates the folder's backbone with the fresh head: rebuild that model here
    run_cfg = to_typed(resolve(compose([*CLASSIFY, f"model.path={tmp_path / 'lm'}"])))
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    _, evals, stats = load_datasets(run_cfg.data, tok, cache_dir=tmp_path / "none" / "data_cache")
    config = for_task(hf_config(run_cfg.model), SEQUENCE_CLASSIFICATION, labels=stats.labels,
                      pad_token_id=tok.pad_token_id)
    clf = build_model(config).eval()
    missing = clf.load_state_dict({k: v for k, v in lm.state_dict().items() if k.startswith("model.")}, strict=False)
    assert missing.missing_keys == ["score.weight"]
    shape = tuple(clf.score.weight.shape)
    head = FreshHead(None, {"score.weight": shape}, std=config.initializer_range, seed=run_cfg.train.seed)
    with torch.no_grad():
        clf.score.weight.copy_(head.read("score.weight", "param", 0, shape[0] * shape[1]).view(shape))
        batch = collate(evals[:], tok.pad_token_id)
        expected = float(class_loss_sum(clf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                        batch["labels"])) / len(evals)
    step0 = [r["eval_loss"] for r in read_metrics(tmp_path / "none") if r.get("step") == 0 and "eval_loss" in r]
    assert step0 and abs(step0[0] - expected) < 1e-5 * expected, (step0, expected)
    train(tmp_path / "fsdp", *job, "train.micro_batch_size=1", nproc=2, parallelism="fsdp")
    assert_close_rel(train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "none"), 1e-5, "fsdp x2 vs none")
    train(tmp_path / "zero3", *job, nproc=2, parallelism="zero3")
    assert_close_rel(train_losses(tmp_path / "zero3"), train_losses(tmp_path / "none"), 1e-5, "zero3 x2 vs none")


def test_data_report_shows_labels_and_the_first_example_with_its_label(tmp_path, tok):
    from fft_dist.data.report import data_report

    rows = [{"text": f"about {w} number {i}", "label": w} for i in range(10) for w in ("cats", "dogs")]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), format=DataFormat.classification,
                     eval_fraction=0.0, shuffle=False)
    text = data_report(cfg, tok, cache_dir=tmp_path / "cache")
    assert "labels (class id = position; loss: one cross-entropy per example): cats 10, dogs 10" in text
    assert "label 'cats'):\nabout cats number 0" in text


def test_estimate_still_runs_for_a_classifier():
    from helpers import fft_dist

    proc = fft_dist("estimate", "data=stdlib_families", timeout=300)
    assert proc.returncode == 0 and "zero3" in proc.stdout, proc.stderr[-3000:]


RANDOM_INIT_JOB = (*TINY_MODEL, *CLASSIFY, "train.max_steps=3")


@pytest.fixture(scope="module")
def random_init_reference(tmp_path_factory) -> list[float]:
    run = tmp_path_factory.mktemp("reference") / "none"
    train(run, *RANDOM_INIT_JOB, nproc=1, parallelism="none")
    return train_losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism,micro", [("fsdp", 1), ("zero3", 2)])
def test_random_init_classifier_matches_one_process(random_init_reference, tmp_path, parallelism, micro):
    """Without model.path the whole classifier (head included) is built from train.seed on every backend."""
    train(tmp_path / parallelism, *RANDOM_INIT_JOB, f"train.micro_batch_size={micro}", nproc=2, parallelism=parallelism)
    assert_close_rel(train_losses(tmp_path / parallelism), random_init_reference, 1e-5,
                     f"{parallelism} x2 vs none, random init")
