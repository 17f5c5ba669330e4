"""Every config group composes and validates; bad configs fail with messages that say what to change."""
from __future__ import annotations

import itertools

import pytest

from helpers import REPO
from fft_dist.compose import compose, resolve, to_typed
from fft_dist.config import ConfigError, Parallelism
from fft_dist.validate import validate


GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
          for g in ("model", "data", "optimizer", "parallelism", "launcher")}


def typed(*overrides: str):
    return to_typed(resolve(compose(list(overrides))))


def test_groups_exist():
    assert {"tiny_llama", "llama3_1b", "llama3_8b", "qwen2_0_5b", "gpt2"} <= set(GROUPS["model"])
    assert set(GROUPS["optimizer"]) == {"adamw", "adam", "sgd"}  # adafactor left the menu (no checkpointing)
    assert {"fsdp", "none"} <= set(GROUPS["parallelism"])
    assert "local" in GROUPS["launcher"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    cfg = typed(f"{group}={option}")
    world = 1 if cfg.parallelism.name == Parallelism.none else 2
    plan = validate(cfg, world)
    assert plan.grad_accum * plan.micro_batch_size * world == cfg.train.global_batch_size


@pytest.mark.parametrize("model,optimizer", list(itertools.product(GROUPS["model"], GROUPS["optimizer"])))
def test_model_and_optimizer_cross_product(model, optimizer):
    """Every model group with every optimizer group builds the optimizer the config describes."""
    import torch

    from fft_dist.optim import optimizer_factory

    cfg = typed(f"model={model}", f"optimizer={optimizer}")
    assert cfg.model.arch["model_type"]
    tiny = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = optimizer_factory(cfg.optimizer, 1e-3)(tiny)
    expected = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    assert type(opt) is expected
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay_of) == 4
    assert decay_of[id(tiny[0].weight)] == cfg.optimizer.weight_decay  # 2-D weights decay
    assert {decay_of[id(p)] for p in (tiny[0].bias, tiny[1].weight, tiny[1].bias)} == {0.0}  # biases, norms do not


def test_model_configs_build_a_transformers_config():
    from fft_dist.model import hf_config

    for model in GROUPS["model"]:
        config = hf_config(typed(f"model={model}").model)
        assert config.model_type in ("llama", "qwen2", "gpt2")


def test_adafactor_is_not_on_the_menu():
    with pytest.raises(Exception, match="adafactor"):
        typed("optimizer=adafactor")


def test_grad_accum_is_derived():
    plan = validate(typed("train.global_batch_size=16", "train.micro_batch_size=2"), 2)
    assert plan.grad_accum == 4


def test_non_divisible_batch_says_what_to_change():
    with pytest.raises(ConfigError, match=r"not divisible.*multiple of 8"):
        validate(typed("train.global_batch_size=12", "train.micro_batch_size=4"), 2)


def test_warmup_longer_than_training():
    with pytest.raises(ConfigError, match="warmup_steps=50 gives 50 warmup steps, longer than training"):
        validate(typed("train.max_steps=10", "train.warmup_steps=50"), 2)


def test_none_backend_needs_one_process():
    with pytest.raises(ConfigError, match="single process"):
        validate(typed("parallelism=none"), 2)


def test_missing_model_path(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        validate(typed(f"model.path={tmp_path / 'nope'}"), 2)


def test_missing_data_path(tmp_path):
    from fft_dist.data import DataError, check_data_files

    with pytest.raises(DataError, match="data.path=.*does not exist"):
        check_data_files(typed(f"data.path={tmp_path / 'missing.jsonl'}").data)


# -- values that used to pass validation and fail (or misbehave) only after the ranks started ----------
@pytest.mark.parametrize("override,message", [
    ("launcher.nproc_per_node=-1", "launcher.nproc_per_node must be >= 1"),
    ("launcher.nproc_per_node=0", "launcher.nproc_per_node must be >= 1"),
    ("train.log_every_steps=0", "train.log_every_steps must be >= 1"),
    ("eval.micro_batch_size=0", "eval.micro_batch_size must be >= 1"),
    ("train.lr=nan", "train.lr must be a finite number > 0"),
    ("train.lr=inf", "train.lr must be a finite number > 0"),
    ("train.lr=1e39", "train.lr must be a finite number > 0"),
    ("dist.timeout_s=0", "dist.timeout_s must be >= 1"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps must be >= 0"),
    ("train.max_grad_norm=nan", "train.max_grad_norm must be a finite number >= 0"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas[1]=1.5 must be in [0, 1)"),
    ("+foo=bar", "unknown config key(s) ['foo']"),
    ("+train.foo=1", "unknown config key(s) ['train.foo']"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        validate(typed(override), 2)
    assert message in str(e.value)


def test_short_runs_just_work_with_the_default_warmup_ratio():
    cfg = typed("train.max_steps=5")
    validate(cfg, 2)
    assert cfg.train.warmup_ratio > 0 and cfg.train.warmup_steps == 0


def test_explicit_warmup_steps_replace_the_default_ratio_and_both_explicit_is_an_error():
    cfg = typed("train.warmup_steps=3")
    assert (cfg.train.warmup_steps, cfg.train.warmup_ratio) == (3, 0.0)
    with pytest.raises(ConfigError, match="not both"):
        validate(typed("train.warmup_steps=3", "train.warmup_ratio=0.1"), 2)


def test_epochs_set_by_the_user_beats_the_default_max_steps():
    cfg = typed("train.epochs=2")
    assert cfg.train.max_steps == 0 and cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="both set the run length"):
        typed("train.epochs=2", "train.max_steps=10")
    assert typed("train.epochs=2", "train.max_steps=0").train.max_steps == 0


def _hf_folder(path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(path)
    return path


def test_model_path_names_and_records_the_model_actually_trained(tmp_path):
    folder = _hf_folder(tmp_path / "my-qwen")
    cfg = typed(f"model.path={folder}")
    assert cfg.model.name == "my-qwen"
    assert cfg.model.arch["hidden_size"] == 32 and cfg.model.arch["num_key_value_heads"] == 1
    assert typed(f"model.path={folder}", "model.name=label").model.name == "label"
    with pytest.raises(ConfigError, match="model.arch.* and model.path both describe the architecture"):
        typed(f"model.path={folder}", "model.arch.hidden_size=64")


def test_data_path_directory_says_what_it_is(tmp_path):
    from fft_dist.data import DataError, check_data_files

    with pytest.raises(DataError, match="is a directory but not a save_to_disk"):
        check_data_files(typed(f"data.path={tmp_path}").data)


def test_a_bug_is_a_traceback_not_a_config_error():
    """Only known error types become exit 2; anything else shows its traceback and exits 1."""
    from fft_dist.errors import CheckpointError, DataError, classify

    assert classify(KeyError("x")) is None and classify(ValueError("x")) is None
    assert classify(ConfigError("x")) == ("config error", 2) and classify(DataError("x")) == ("data error", 2)
    assert classify(CheckpointError("x")) == ("checkpoint error", 4)
