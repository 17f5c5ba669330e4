"""Every optimizer option does something or is refused: each `optimizer=` option has its own schema
(fft_dist.config.optimizer), so a key it lacks is an error naming the key, never silently ignored."""
from __future__ import annotations

import pytest
import torch

from helpers import fft_dist
from fft_dist.compose import compose, load_yaml, resolve, to_typed, to_yaml
from fft_dist.config import AdamConfig, AdamWConfig, ConfigError, FFTConfig, SGDConfig
from fft_dist.optim import optimizer_factory
from fft_dist.validate import validate


def typed(*overrides: str):
    return to_typed(resolve(compose(list(overrides))))


@pytest.mark.parametrize("overrides,key", [
    (["optimizer=adamw", "optimizer.momentum=0.9"], "optimizer.momentum"),
    (["optimizer=sgd", "optimizer.betas=[0.9,0.95]"], "optimizer.betas"),
])
def test_an_option_the_chosen_optimizer_lacks_is_refused_by_the_cli(overrides, key, tmp_path):
    proc = fft_dist("train", "--cfg", "job", f"run.dir={tmp_path / 'r'}", *overrides, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "config error" in proc.stderr and key in proc.stderr


def test_the_valid_options_are_accepted_by_the_cli(tmp_path):
    proc = fft_dist("train", "--cfg", "job", f"run.dir={tmp_path / 'r'}", "optimizer=sgd", "optimizer.momentum=0.5",
                    "optimizer.nesterov=true", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "momentum: 0.5" in proc.stdout and "nesterov: true" in proc.stdout and "betas" not in proc.stdout


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


def test_a_users_own_optimizer_file_is_checked_against_its_schema(tmp_path):
    folder = tmp_path / "conf" / "optimizer"
    folder.mkdir(parents=True)
    (folder / "my_sgd.yaml").write_text("defaults: [/optimizer_schema/sgd@_here_, _self_]\n"  # as conf/optimizer/sgd.yaml
                                        "name: sgd\nmomentum: 0.5\nbetas: [0.9, 0.9]\n")
    proc = fft_dist("train", "--config-dir", str(tmp_path / "conf"), "optimizer=my_sgd", "--cfg", "job", timeout=120)
    assert proc.returncode == 2 and "optimizer.betas is not an option of optimizer=sgd" in proc.stderr, proc.stderr
