"""optimizer.layer_lr_decay (issue 20), in process: decoder layer l (0-based) of L trains at lr * gamma^(L - l),
the input embeddings (and a head tied to them) at lr * gamma^(L + 1), the head and final norm at lr: which
parameter gets which factor (untied and tied heads), the lr each group gets from the schedule, the refusals.
Real processes: tests/e2e/test_layer_lr.py."""
from __future__ import annotations

import pytest
import torch

from layer_lr_shared import GAMMA, LAYERS, expected, tiny_llama, typed
from fft_dist.config import ConfigError
from fft_dist.optim import optimizer_factory, param_groups, set_lr
from fft_dist.validate import validate

@pytest.mark.parametrize("tied", [False, True])
def test_each_parameter_gets_its_layers_factor(tied):
    model = tiny_llama(tied)
    cfg = typed("optimizer=sgd", f"optimizer.layer_lr_decay={GAMMA}").optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg)
    seen = 0
    for g in groups:
        for p in g["params"]:
            assert g["lr_scale"] == pytest.approx(expected(names[id(p)])), names[id(p)]
            seen += 1
    assert seen == len(names)
    if tied:  # one tensor, the embeddings' rate
        assert "lm_head.weight" not in names.values()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    optimizer = optimizer_factory(cfg, 0.1)(model)
    set_lr(optimizer, 0.2)
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == sorted(
        {round(0.2 * GAMMA ** k, 12) for k in range(LAYERS + 2)})


def test_off_by_default_keeps_todays_groups():
    model = tiny_llama(False)
    groups = param_groups(model, typed().optimizer)
    assert len(groups) == 2 and all("lr_scale" not in g for g in groups)


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan"])
def test_a_factor_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match=r"optimizer\.layer_lr_decay must be in \(0, 1\]"):
        validate(typed(f"optimizer.layer_lr_decay={value}"), 2)


def test_a_model_without_decoder_layers_is_refused():
    cfg = typed("optimizer.layer_lr_decay=0.9").optimizer
    with pytest.raises(ConfigError, match="no decoder-layer list"):
        param_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)), cfg)
