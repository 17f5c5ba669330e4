"""What a backend needs from the launch side comes from its descriptor (``Backend.deepspeed_stage``), never
from its name: the toy backend (tests/support/toy_backend.py), registered once as torch-run and once as a ZeRO-3
engine, shows that the field alone decides whether launcher.use_deepspeed_launcher may start its ranks, and
which DeepSpeed `auto` options a rank and an estimate decide for it. In-process, no ranks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import toy_backend  # registers parallelism=toy (deepspeed_stage None: torch runs it)
from helpers import SUPPORT
from fft_dist.compose import checked, typed
from fft_dist.config import ConfigError
from fft_dist.strategy import device_defaults, get, register
from fft_dist.strategy.sizing import planned

SLURM_DEEPSPEED = ["parallelism=toy", "launcher=slurm", "launcher.use_deepspeed_launcher=true",
                   "launcher.gpus_per_node=0", "launcher.nproc_per_node=1"]


def toy_config(*overrides: str):
    return typed([*SLURM_DEEPSPEED, *overrides], config_dirs=[str(SUPPORT / "toy_conf")])


@pytest.fixture
def toy_as_zero3():
    """The same toy backend, described as one DeepSpeed's engine runs at stage 3 (nothing else changes)."""
    register(dataclasses.replace(toy_backend.BACKEND, deepspeed_stage=3))
    try:
        yield
    finally:
        register(toy_backend.BACKEND)


def test_a_torch_run_backend_refuses_the_deepspeed_launcher_by_its_descriptor():
    cfg, yaml = toy_config()
    assert get("toy").deepspeed_stage is None
    with pytest.raises(ConfigError, match="for the ZeRO backends .*parallelism=toy keep the default"):
        checked(cfg, yaml)
    decided = device_defaults(cfg, torch.device("cpu"))
    assert not decided.deepspeed and "overlap_comm" not in decided.banner()
    assert planned(cfg, "toy").overlap_comm is False  # an estimate row decides as the rank does


def test_the_descriptor_s_deepspeed_stage_alone_makes_it_a_deepspeed_backend(toy_as_zero3):
    cfg, yaml = toy_config()
    assert checked(cfg, yaml).plan.world_size == 1  # the deepspeed launcher is accepted now
    decided = device_defaults(cfg, torch.device("cpu"))
    assert decided.deepspeed and "overlap_comm off" in decided.banner()  # CPU: overlap off, as for zero3
    assert planned(cfg, "toy").overlap_comm is True  # on a GPU, stage 3's default: DeepSpeed's own
