"""Every optimizer option does something or is refused: each `optimizer=` option has its own schema
(fft_dist.config.optimizer), so a key it lacks is an error naming the key, never silently ignored."""
from __future__ import annotations

import pytest
import torch

from fft_dist.compose import compose, load_yaml, resolve, to_typed, to_yaml
from fft_dist.config import AdamConfig, AdamWConfig, ConfigError, FFTConfig, SGDConfig
from fft_dist.optim import optimizer_factory
from fft_dist.validate import validate


def typed(*overrides: str):
    return to_typed(resolve(compose(list(overrides))))


@pytest.mark.parametrize("overrides,message", [
    (["+optimizer.momentum=0.9"], "optimizer.momentum is not an option of optimizer=adamw"),
    (["optimizer=sgd", "+optimizer.eps=1e-6"], "optimizer.eps is not an option of optimizer=sgd"),
    (["optimizer.name=sgd"], "optimizer.betas is not an option of optimizer=sgd"),
    (["optimizer=sgd", "optimizer.momentum=abc"], "optimizer.momentum:"),
])
def test_what_slips_past_hydra_is_refused_when_typed(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        typed(*overrides)


@pytest.mark.parametrize("overrides,message", [
    (["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"], "optimizer.nesterov=true needs"),
    (["optimizer=adam", "optimizer.betas=[0.9,1.0]"], "optimizer.betas[1]=1.0 must be in [0, 1)"),
    (["optimizer=sgd", "optimizer.momentum=-1"], "optimizer.momentum must be a finite number >= 0"),
])
def test_bad_values_are_refused_by_the_options_own_checks(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(typed(*overrides), 2)
    assert message in str(e.value)


def test_each_option_reaches_torch():
    model = torch.nn.Linear(3, 3)
    sgd = optimizer_factory(typed("optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0.7").optimizer, 0.1)(model)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"] is True and sgd.defaults["momentum"] == 0.7
    adam = optimizer_factory(typed("optimizer=adam", "optimizer.betas=[0.8,0.9]", "optimizer.eps=1e-6").optimizer, 0.1)(model)
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["eps"] == 1e-6
    adamw = optimizer_factory(typed().optimizer, 0.1)(model)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.9, 0.95)


def test_the_typed_config_is_the_options_own_dataclass_on_every_path(tmp_path):
    """Composed (launcher), read back from config.yaml (ranks), and built in Python (defaults)."""
    for option, schema in (("adamw", AdamWConfig), ("adam", AdamConfig), ("sgd", SGDConfig)):
        cfg = typed(f"optimizer={option}")
        assert type(cfg.optimizer) is schema
        (tmp_path / "config.yaml").write_text(to_yaml(cfg))
        assert load_yaml(tmp_path / "config.yaml").optimizer == cfg.optimizer
    assert type(FFTConfig().optimizer) is AdamWConfig
    (tmp_path / "config.yaml").write_text(to_yaml(typed("optimizer=sgd")).replace("nesterov: false", "nesterov: false\n  betas: [0.9, 0.9]"))
    with pytest.raises(ConfigError, match=r"optimizer\.betas is not an option of optimizer=sgd"):
        load_yaml(tmp_path / "config.yaml")


def test_each_optimizer_says_how_it_is_built_and_sized_in_its_own_dataclass():
    """One home per optimizer: building and sizing read the dataclass, never branch on its name."""
    from fft_dist.config import OPTIMIZERS, OptimizerConfig
    from fft_dist.strategy.sizing import optimizer_bytes_per_param

    model = torch.nn.Linear(4, 4)
    expected = {"adamw": (torch.optim.AdamW, 8), "adam": (torch.optim.Adam, 8), "sgd": (torch.optim.SGD, 4)}
    assert set(OPTIMIZERS.schemas) == set(expected)
    for name, schema in OPTIMIZERS.schemas.items():
        assert schema.build is not OptimizerConfig.build and schema.state_bytes_per_param is not \
            OptimizerConfig.state_bytes_per_param, name
        cfg = typed(f"optimizer={name}")
        built = optimizer_factory(cfg.optimizer, 0.1)(model)
        assert type(built) is expected[name][0]
        assert optimizer_bytes_per_param(cfg) == expected[name][1]
    assert optimizer_bytes_per_param(typed("optimizer=sgd", "optimizer.momentum=0")) == 0
