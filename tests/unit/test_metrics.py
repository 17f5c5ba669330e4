"""Experiment tracking: the W&B run (offline, no network) holds the resolved config and every
metrics record at its step; settings that cannot work are refused before launch."""
from __future__ import annotations

import sys

import pytest

from fft_dist.config import ConfigError, FFTConfig, LoggingConfig, WandbConfig
from fft_dist.metrics import MetricsWriter, check_logging


def _cfg(**wandb: object) -> FFTConfig:
    return FFTConfig(logging=LoggingConfig(wandb=WandbConfig(**wandb)))


def test_check_logging_refuses_wandb_when_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like
    check_logging(_cfg(enabled=False))  # off: wandb is not needed
    with pytest.raises(ConfigError, match=r"logging\.wandb\.enabled=true.*pip install 'fft-dist\[wandb\]'"):
        check_logging(_cfg(enabled=True))


def test_check_logging_refuses_bad_mode_and_empty_project(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x")  # online needs a key (tests/unit/test_model_checks.py)
    check_logging(_cfg(enabled=True, mode="online"))
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode='disabled'"):
        check_logging(_cfg(enabled=True, mode="disabled"))
    with pytest.raises(ConfigError, match=r"logging\.wandb\.project"):
        check_logging(_cfg(enabled=True, project=""))


def test_writer_on_other_ranks_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False, config_yaml="a: 1\n",
                           logging_cfg=LoggingConfig(wandb=WandbConfig(enabled=True, dir=str(tmp_path))))
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []
