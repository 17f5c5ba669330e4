"""Every config group composes and validates; bad configs fail with messages that say what to change."""
from __future__ import annotations

import itertools

import pytest

from helpers import REPO, fft_dist
from fft_dist.config import Parallelism, ConfigError, compose, resolve, to_typed, validate

GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
          for g in ("model", "data", "optimizer", "parallelism", "launcher")}


def typed(*overrides: str):
    return to_typed(resolve(compose(list(overrides))))


def test_groups_exist():
    assert {"tiny_llama", "llama3_1b", "llama3_8b", "qwen2_0_5b", "gpt2"} <= set(GROUPS["model"])
    assert {"adamw", "adam", "sgd", "adafactor"} <= set(GROUPS["optimizer"])
    assert {"fsdp", "none"} <= set(GROUPS["parallelism"])
    assert "local" in GROUPS["launcher"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    no_ckpt = ["checkpoint.save_final=false"] if (group, option) == ("optimizer", "adafactor") else []
    cfg = typed(f"{group}={option}", *no_ckpt)
    world = 1 if cfg.parallelism.name == Parallelism.none else 2
    plan = validate(cfg, world)
    assert plan.grad_accum * plan.micro_batch_size * world == cfg.train.global_batch_size


@pytest.mark.parametrize("model,optimizer", list(itertools.product(GROUPS["model"], GROUPS["optimizer"])))
def test_model_and_optimizer_cross_product(model, optimizer):
    cfg = typed(f"model={model}", f"optimizer={optimizer}")
    assert cfg.model.arch["model_type"]
    assert cfg.optimizer.name.value == optimizer


def test_model_configs_build_a_transformers_config():
    from fft_dist.model import hf_config

    for model in GROUPS["model"]:
        config = hf_config(typed(f"model={model}").model)
        assert config.model_type in ("llama", "qwen2", "gpt2")


def test_adafactor_with_checkpoints_is_refused_before_training():
    with pytest.raises(ConfigError, match="checkpoint.save_final=false"):
        validate(typed("optimizer=adafactor"), 2)
    with pytest.raises(ConfigError, match="adafactor"):
        validate(typed("optimizer=adafactor", "checkpoint.save_final=false", "checkpoint.every_steps=5"), 2)


def test_grad_accum_is_derived():
    plan = validate(typed("train.global_batch_size=16", "train.micro_batch_size=2"), 2)
    assert plan.grad_accum == 4


def test_non_divisible_batch_says_what_to_change():
    with pytest.raises(ConfigError, match=r"not divisible.*multiple of 8"):
        validate(typed("train.global_batch_size=12", "train.micro_batch_size=4"), 2)


def test_warmup_longer_than_training():
    with pytest.raises(ConfigError, match="warmup_steps=50 is longer than training"):
        validate(typed("train.max_steps=10", "train.warmup_steps=50"), 2)


def test_none_backend_needs_one_process():
    with pytest.raises(ConfigError, match="single process"):
        validate(typed("parallelism=none"), 2)


def test_missing_model_path(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        validate(typed(f"model.path={tmp_path / 'nope'}"), 2)


def test_missing_data_path(tmp_path):
    with pytest.raises(ConfigError, match="data.path=.*does not exist"):
        validate(typed(f"data.path={tmp_path / 'missing.jsonl'}"), 2)


def test_resume_path_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="resume=.*does not exist"):
        validate(typed(f"resume={tmp_path / 'ckpt'}"), 2)


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "Key 'max_stepz' not in 'TrainConfig'"),
    ("train.lr=abc", "could not be converted to Float"),
    ("train.precision=fp8", "expected one of [fp32, bf16, fp16]"),
    ("parallelism=zero9", "Could not find 'parallelism/zero9'"),
    ("train.global_batch_size=10", "not divisible"),
    ("model.path=/definitely/not/here", "not a Hugging Face model folder"),
])
def test_cli_rejects_bad_config_before_any_rank_starts(override, message, tmp_path):
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", override, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "config error" in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a rejected config"
