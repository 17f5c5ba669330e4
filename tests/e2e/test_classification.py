"""data.format=classification: rows become (tokens, class id), bad labels and columns are named before
training, the loss is per example over the whole global batch (same under fsdp / zero3 as on one
process), a causal-LM folder gets a fresh head, checkpoints keep their task, and the export loads
as AutoModelForSequenceClassification with the trained model's numbers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from doc_pages import block_after
from helpers import TINY_MODEL, assert_close_rel, child_env, read_metrics, train, train_losses
from fft_dist.data import collate, load_datasets
from fft_dist.loss import CLASSES, class_loss_sum
from fft_dist.model import BUNDLED_TOKENIZER
from classification_shared import tok


CLASSIFY = ["data=stdlib_families", "data.max_length=48", "eval.max_batches=0", "checkpoint.save_final=false",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=0", "eval.every_steps=0"]


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
