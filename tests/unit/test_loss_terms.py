"""The loss as a component: terms normalised in one place, the registry, and a user's own term added
from tests/support/plugins through loss.plugins (the same register_term the built-in router term uses)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from fft_dist.config import DataFormat, LossConfig
from fft_dist.errors import ConfigError
from fft_dist.loss import TOKENS, build_loss, check, registered
from fft_dist.loss.router_aux import make_router_aux
from fft_dist.loss.terms import TermContext
from loss_terms_shared import PLUGINS


sys.path.insert(0, str(PLUGINS))


def batch(seed: int, rows: int = 2, length: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 11, (rows, length), generator=g)
    labels[:, :2] = -100
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, -1] = 0
    return {"labels": labels, "attention_mask": mask, "logits": torch.randn(rows, length, 11, generator=g)}


def step(loss, batches, aux=None):
    """The trainer's use of StepLoss on one rank: (summed backward objective, logged parts)."""
    counts = torch.tensor(loss.local_counts(batches), dtype=torch.float64)
    sums, total = loss.new_sums("cpu"), 0.0
    for i, b in enumerate(batches):
        out = SimpleNamespace(logits=b["logits"], aux_loss=None if aux is None else aux[i])
        total = total + loss.micro_batch(b, out, counts, sums)
    return float(total), loss.parts(sums.tolist(), counts.tolist())


def toy_loss(**terms):
    import toy_loss_terms  # noqa: F401 - registers z_loss

    return build_loss(LossConfig(terms=terms), fmt=DataFormat.text, model_config=SimpleNamespace())


def test_every_term_is_normalised_by_its_global_count_whatever_the_split():
    loss = toy_loss(z_loss={"weight": 0.01})
    whole = batch(0, rows=4)
    halves = [{k: v[:2] for k, v in whole.items()}, {k: v[2:] for k, v in whole.items()}]
    (t1, p1), (t2, p2) = step(loss, [whole]), step(loss, halves)
    assert t1 == pytest.approx(t2, rel=1e-6) and p1 == pytest.approx(p2, rel=1e-6)
    assert set(p1) == {"ce", "z_loss"} and t1 == pytest.approx(p1["ce"] + 0.01 * p1["z_loss"], rel=1e-6)
    logits = whole["logits"]
    assert p1["z_loss"] == pytest.approx(float(torch.logsumexp(logits, -1).square()[whole["attention_mask"] > 0].mean()),
                                         rel=1e-6)


def test_router_aux_term_keeps_the_loops_old_arithmetic_bit_for_bit():
    """The term gives exactly what the trainer computed inline before it became a term."""
    config = SimpleNamespace(output_router_logits=True, router_aux_loss_coef=0.02)
    loss = build_loss(LossConfig(chunk_size=0), fmt=DataFormat.text, model_config=config)  # fed full logits
    batches, aux = [batch(1), batch(2)], [torch.tensor(1.7), torch.tensor(2.3)]
    counts = torch.tensor(loss.local_counts(batches), dtype=torch.float64)
    sums = loss.new_sums("cpu")
    for b, a in zip(batches, aux):
        got = loss.micro_batch(b, SimpleNamespace(logits=b["logits"], aux_loss=a), counts, sums)
        ce = TOKENS.loss_sum(b["logits"], b["labels"])
        weighted = a.float() * (int(b["attention_mask"].sum()) / counts[1].to(a.device, torch.float32))
        assert torch.equal(got, ce / counts[0].to(torch.float32) + 0.02 * weighted)
    assert loss.metrics(loss.parts(sums.tolist(), counts.tolist())).keys() == {"router_aux_loss"}


def test_router_aux_is_off_for_a_dense_model_and_takes_no_options():
    ctx = TermContext(model_config=SimpleNamespace(), objective_unit="tokens")
    assert make_router_aux({}, ctx) is None
    with pytest.raises(ConfigError, match="loss.terms.router_aux takes no options"):
        make_router_aux({"weight": 1.0}, ctx)


@pytest.mark.parametrize("options,message", [
    ({"terms": {"kl_ref": {}}}, "loss.terms: unknown term(s) ['kl_ref']"),
    ({"plugins": ["/tmp/evil.py"]}, "loss.plugins: '/tmp/evil.py' is not an importable module name"),
    ({"plugins": ["os; rm -rf"]}, "is not an importable module name"),
    ({"plugins": ["no_such_pkg_for_fft_dist.terms"]}, "loss.plugins: cannot import 'no_such_pkg_for_fft_dist.terms'"),
])
def test_unknown_terms_and_plugins_are_config_errors(options, message):
    with pytest.raises(ConfigError) as e:
        check(LossConfig(**options), fmt=DataFormat.text)
    assert message in str(e.value)


def test_a_term_needing_a_reference_model_is_refused_until_the_loop_provides_one():
    from fft_dist.loss import register_term

    register_term("needs_reference", lambda options, context: SimpleNamespace(
        name="needs_reference", unit="tokens", weight=1.0, needs=frozenset({"reference_logits"}), metric="x"))
    with pytest.raises(ConfigError, match=r"loss.terms.needs_reference needs \['reference_logits'\]"):
        check(LossConfig(terms={"needs_reference": {}}), fmt=DataFormat.text)
    assert "needs_reference" in registered()
