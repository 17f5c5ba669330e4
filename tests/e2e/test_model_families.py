"""Every model a user brings (issue #16 items 2-6): buffers after a meta-device build, attention a family
cannot run, a model folder without a tokenizer, new tokens, and mismatches found before launch.

The family-by-backend conformance matrix is tests/e2e/test_families.py; these are the cases
each finding needs, as cheap as they can be (pure checks in process, dry runs before launch, few real runs).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY_TRAIN, fft_dist, read_metrics, step_records, train, REPO
from model_families_shared import config_of


BUNDLED = REPO / "fft_dist" / "assets" / "tokenizer"


def folder(tmp: Path, family: str, *, tokenizer: bool = True) -> Path:
    """A tiny random-weight model written by save_pretrained (seeded), with the bundled tokenizer's files."""
    from transformers import AutoModelForCausalLM

    path = tmp / family
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config_of(family)).save_pretrained(path)
    if tokenizer:
        for f in BUNDLED.iterdir():
            shutil.copy(f, path / f.name)
    return path


def dry(*overrides: str):
    return fft_dist("launch", *overrides, "launcher.dry_run=true", timeout=120)


# -- 2 and 3. Gemma from model.path under fsdp, with the attention it supports ------------------------------------
def test_gemma2_from_a_model_folder_trains_under_fsdp_with_the_attention_it_supports(tmp_path):
    path = folder(tmp_path, "gemma2")
    refused = dry(f"model.path={path}", "model.attn_implementation=sdpa", f"run.dir={tmp_path / 'x'}")
    assert refused.returncode == 2 and "does not support it for gemma2" in refused.stderr, refused.stderr
    assert "eager" in refused.stderr and "Traceback" not in refused.stderr
    run = tmp_path / "run"
    proc = train(run, *TINY_TRAIN, f"model.path={path}", "train.max_steps=2")
    assert "eager attention" in proc.stdout, "the banner says which kernel auto picked"
    losses = [r["loss"] for r in step_records(run)]
    assert len(losses) == 2 and all(l == l and l < 20 for l in losses), losses  # finite, no NaN at step 1


# -- 4. a model folder without a tokenizer ---------------------------------------------------------------------------
def test_a_model_folder_without_a_tokenizer_is_refused_unless_one_is_named(tmp_path):
    path = folder(tmp_path, "llama", tokenizer=False)
    refused = dry(f"model.path={path}", f"run.dir={tmp_path / 'r'}")
    assert refused.returncode == 2 and "has no tokenizer files" in refused.stderr, refused.stderr
    assert "model.tokenizer=bundled" in refused.stderr
    assert dry(f"model.path={path}", "model.tokenizer=bundled", f"run.dir={tmp_path / 'r'}").returncode == 0


# -- 5 and 6. new tokens, and a tokenizer the embeddings cannot hold ---------------------------------------------------
def test_a_tokenizer_larger_than_the_embeddings_is_refused_before_launch(tmp_path):
    proc = dry("model.arch.vocab_size=1000", f"run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "has 2048 tokens but the model's embeddings have 1000 rows" in proc.stderr
    assert "model.pad_vocab_to_multiple_of" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists(), "refused before launch: nothing written"


NEW = ["<|tool|>", "<|obs|>", "<|think|>", "<|/think|>", "<|end|>"]


@pytest.mark.slow
def test_new_tokens_grow_the_embeddings_on_every_backend_and_resume_and_export_carry_them(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from fft_dist import checkpoint as ckpt

    path = folder(tmp_path, "llama")
    job = [*TINY_TRAIN, f"model.path={path}", "train.max_steps=2", "checkpoint.save_final=true",
           f"model.add_tokens=[{','.join(repr(t) for t in NEW)}]", "model.pad_vocab_to_multiple_of=64"]
    first = {}
    for parallelism, nproc in (("none", 1), ("fsdp", 2), ("zero3", 2)):
        run = tmp_path / parallelism
        proc = train(run, *job, nproc=nproc, parallelism=parallelism)
        assert "5 added, embeddings 2048 -> 2112 rows" in proc.stdout, proc.stdout[-2000:]
        first[parallelism] = [r["loss"] for r in step_records(run)]
    for parallelism in ("fsdp", "zero3"):
        for a, b in zip(first[parallelism], first["none"]):
            assert abs(a - b) / b < 1e-5, (parallelism, first)
    run = tmp_path / "fsdp"
    train(run, *job, "train.max_steps=3", "resume=auto", "checkpoint.export_final=true")
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] == 3
    reader = ckpt.CheckpointReader(run / "checkpoints" / "step-0000003")
    assert reader.shape("model.embed_tokens.weight") == (2112, 64)
    tok = AutoTokenizer.from_pretrained(run / "hf")
    assert len(tok) == 2053 and tok.convert_tokens_to_ids(NEW) == list(range(2048, 2053))
    weights = load_file(next((run / "hf").glob("model-*.safetensors")))
    assert weights["model.embed_tokens.weight"].shape == (2112, 64) and weights["lm_head.weight"].shape == (2112, 64)


MOE = ["model.name=moe", "model.arch.model_type=mixtral", "model.arch.intermediate_size=64",
       "+model.arch.num_local_experts=4", "+model.arch.num_experts_per_tok=2", "+model.arch.output_router_logits=true",
       "+model.arch.router_aux_loss_coef=0.02"]


@pytest.mark.slow
def test_the_routers_load_balancing_loss_is_a_term_of_its_own_with_parity_across_backends(tmp_path):
    """output_router_logits in the model's config: the aux loss is added (token-weighted over the
    micro batches, see fft_dist.loss.router_aux_loss), logged as router_aux_loss, and every backend
    agrees on both terms for 3 steps."""
    from helpers import TINY_JOB

    curves = {}
    for parallelism, nproc in (("none", 1), ("fsdp", 2), ("zero2", 2), ("zero3", 2)):
        run = tmp_path / parallelism
        train(run, *TINY_JOB, *MOE, "train.max_steps=3", nproc=nproc, parallelism=parallelism)
        steps = step_records(run)
        curves[parallelism] = [(r["loss"], r["router_aux_loss"]) for r in steps]
    reference = curves.pop("none")
    assert all(aux > 0 for _, aux in reference)
    for parallelism, curve in curves.items():
        for (loss, aux), (loss0, aux0) in zip(curve, reference):
            assert abs(loss - loss0) / loss0 < 1e-5 and abs(aux - aux0) / aux0 < 1e-5, (parallelism, curve, reference)
