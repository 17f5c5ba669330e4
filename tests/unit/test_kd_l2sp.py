"""Distillation (loss.kd), issue 20, in process (fp32, tiny models of tests/support/chunked_shared.py):
- the KL of a model with itself is 0 and so is its gradient, on full logits and chunked;
- the chunked KL equals the full-logits one within 1e-6 relative (and its gradient within 1e-6 in norm), with a
  temperature and with Gemma-2's soft-capping; a bf16 reference stays within its stated tolerance;
- distillation with a classification format is refused; L2-SP under hsdp is refused before launch (exit 2).
Real runs (parity between backends, exact resume, L2-SP): tests/e2e/test_kd_l2sp.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from chunked_shared import batch, tiny_model


def _kd_and_grads(model, reference, b: dict, chunk: int, temperature: float):
    from fft_dist.loss import ReferenceRows, kl_logits_sum
    from fft_dist.loss.kd import ChunkedHeadWithKD
    from fft_dist.models.head import deferred_head

    model.zero_grad()
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    if not chunk:
        with torch.no_grad():
            ref_logits = reference(**inputs).logits
        kd = kl_logits_sum(model(**inputs).logits, ref_logits, b["labels"], temperature)
    else:
        rows = ReferenceRows(b["labels"])
        with torch.no_grad(), deferred_head(reference, rows):
            reference(**inputs)
        with deferred_head(model, ChunkedHeadWithKD(b["labels"], chunk, rows.result, temperature)):
            kd = model(**inputs).loss[1]
    kd.backward()
    return float(kd.detach()), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("chunk", [0, 7])
def test_kl_of_a_model_with_itself_is_zero(chunk):
    model = tiny_model("llama")
    b = batch(model.config.vocab_size)
    kd, grad = _kd_and_grads(model, copy.deepcopy(model), b, chunk, 2.0)
    print(f"chunk {chunk}: self KL {kd:.3e}, grad norm {float(grad.norm()):.3e}")
    assert abs(kd) <= 1e-6 and float(grad.norm()) <= 1e-6


@pytest.mark.parametrize("family,temperature", [("llama", 1.0), ("llama", 2.0), ("gemma2", 1.5)])
def test_chunked_kl_equals_full_logits(family, temperature):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the model
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = batch(model.config.vocab_size)
    full, full_grad = _kd_and_grads(model, reference, b, 0, temperature)
    assert full > 1e-3
    for chunk in (7, 4096):
        kd, grad = _kd_and_grads(model, reference, b, chunk, temperature)
        rel, grad_rel = abs(kd - full) / full, float((grad - full_grad).norm() / full_grad.norm())
        print(f"{family} T={temperature} chunk {chunk}: {kd:.7f} vs {full:.7f} (rel {rel:.1e}), grad rel {grad_rel:.1e}")
        assert rel <= 1e-6 and grad_rel <= 1e-6


def test_a_bf16_reference_is_within_its_stated_tolerance():
    """loss.kd.reference_dtype=bf16: kd_loss within 1e-2 of its value with an fp32 reference (as documented)."""
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = batch(model.config.vocab_size)
    fp32, _ = _kd_and_grads(model, reference, b, 7, 1.0)
    bf16, _ = _kd_and_grads(model, reference.to(torch.bfloat16), b, 7, 1.0)
    print(f"kd with an fp32 reference {fp32:.6f}, bf16 {bf16:.6f} (rel {abs(bf16 - fp32) / fp32:.1e})")
    assert abs(bf16 - fp32) <= 1e-2 * fp32


def test_kd_is_refused_with_a_classification_format():
    from fft_dist.config import LossConfig
    from fft_dist.config.loss import KDConfig
    from fft_dist.errors import ConfigError
    from fft_dist.loss import check

    with pytest.raises(ConfigError, match="loss.kd.weight"):
        check(LossConfig(kd=KDConfig(weight=0.5)), fmt="classification")
    check(LossConfig(kd=KDConfig(weight=0.5)), fmt="text")


def test_l2sp_under_hsdp_is_refused_before_launch(tmp_path):
    """The launcher's validation says it (exit 2, naming both options); the ranks' own refusal stays behind it."""
    from launch_checks import cli
    from helpers import TINY_JOB

    code, _, err = cli("train", *TINY_JOB, f"run.dir={tmp_path}", "parallelism=hsdp", "parallelism.shard_size=1",
                       "launcher.nproc_per_node=2", "loss.l2sp.weight=0.1", "launcher.dry_run=true")
    assert code == 2 and "loss.l2sp.weight=0.1: parallelism=hsdp" in err, err
    from fft_dist.compose import compose, resolve, to_typed
    from fft_dist.validate import validate

    validate(to_typed(resolve(compose([*TINY_JOB, "loss.l2sp.weight=0.1"]))), 2)  # fsdp (the default): accepted
