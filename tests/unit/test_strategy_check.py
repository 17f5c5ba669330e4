"""fft_dist.strategy.check: every parallelism option does something under the chosen backend or is refused
before any rank starts, with a message that names the option. Fast: no processes except the import test."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest

import toy_backend  # registers parallelism=toy: a backend of your own gets the same refusals
from helpers import SUPPORT
from fft_dist.compose import compose, to_typed
from fft_dist.config import BatchPlan, ConfigError, Parallelism, ParallelismConfig, Precision
from fft_dist.strategy import check, register
from fft_dist.strategy.backend import backends, check_options


PLAN = BatchPlan(world_size=2, micro_batch_size=4, grad_accum=2, global_batch_size=16)


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed")


# A non-default value for every option (ParallelismConfig's defaults decide what "set" means).
NON_DEFAULT = {
    "reshard_after_forward": False, "offload_optimizer": True, "offload_params": True, "overlap_comm": True,
    "bf16_weights": True,
    "contiguous_gradients": False, "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
    "prefetch_bucket_size": 500_000_000, "param_persistence_threshold": 100000,
    "deepspeed_overrides": {"zero_optimization": {"sub_group_size": 1000}}, "shard_size": 2,
}


def cfg_for(group: str, *overrides: str):
    dirs = [str(SUPPORT / "toy_conf")] if group == "toy" else None
    return to_typed(compose([f"parallelism={group}", *overrides], config_dirs=dirs))


def with_option(group: str, option: str):
    cfg = cfg_for(group)
    setattr(cfg.parallelism, option, NON_DEFAULT[option])
    return cfg


FIELDS = [f.name for f in dataclasses.fields(ParallelismConfig) if f.name != "name"]


def test_every_option_belongs_to_a_backend():
    """A new ParallelismConfig field must be read by some backend (listed in its descriptor's options)."""
    assert {option for b in backends() for option in b.options} == set(FIELDS)
    assert set(NON_DEFAULT) == set(FIELDS)
    for name, value in NON_DEFAULT.items():
        assert getattr(ParallelismConfig(), name) != value, name


@pytest.mark.parametrize("option", FIELDS)
@pytest.mark.parametrize("backend", backends(), ids=lambda b: b.name)
def test_each_backend_refuses_exactly_the_options_it_does_not_read(backend, option):
    """From the descriptors alone, for every registered backend (toy included): no table to keep."""
    par = ParallelismConfig(name=Parallelism(backend.name))
    setattr(par, option, NON_DEFAULT[option])
    if option in backend.options:
        check_options(par)
        return
    with pytest.raises(ConfigError) as e:
        check_options(par)
    msg = str(e.value)
    readers = ", ".join(b.name for b in backends() if option in b.options)
    assert f"parallelism.{option}=" in msg and f"no effect under parallelism={backend.name} " in msg, msg
    assert f"(read by {readers} only; " in msg and "Remove it (default: " in msg, msg


def test_a_backend_of_your_own_is_refused_what_it_does_not_read():
    """The refusal runs in the registry's check, not in a backend's own: toy's descriptor has no check."""
    assert toy_backend.BACKEND.check is None
    cfg = cfg_for("toy", "parallelism.reshard_after_forward=false")
    with pytest.raises(ConfigError, match=r"parallelism\.reshard_after_forward=False has no effect under "
                                          r"parallelism=toy \(read by fsdp, hsdp only; use parallelism=fsdp or hsdp\)"):
        check(cfg, BatchPlan(1, 4, 4, 16))


def test_a_descriptor_naming_an_unknown_option_is_not_registered():
    with pytest.raises(ValueError, match=r"names \['shard_sise'\], which are not parallelism\.\* options"):
        register(dataclasses.replace(toy_backend.BACKEND, name="typo", options=("shard_sise",)))
    assert "typo" not in {b.name for b in backends()}


@pytest.mark.parametrize("group", ["none", "fsdp", "zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_shipped_groups_pass(group):
    if group.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed")
    check(cfg_for(group), BatchPlan(1, 4, 4, 16) if group == "none" else PLAN)


@pytest.mark.parametrize("option", list(dict.fromkeys(o for b in backends() if b.deepspeed_stage for o in b.options)))
@pytest.mark.parametrize("group", ["none", "fsdp"])
def test_deepspeed_options_refused_outside_deepspeed(group, option):
    with pytest.raises(ConfigError) as e:
        check(with_option(group, option), PLAN)
    msg = str(e.value)
    assert f"parallelism.{option}=" in msg and f"no effect under parallelism={group}" in msg, msg


@pytest.mark.parametrize("option", ["offload_optimizer", "offload_params"])
def test_fsdp_offload_is_refused_with_the_deepspeed_alternative(option):
    with pytest.raises(ConfigError, match=rf"parallelism\.{option}=True has no effect under parallelism=fsdp "
                                          r"\(read by zero[23].* only; FSDP2 CPU offload is not implemented; "
                                          r"parallelism=zero2_offload"):
        check(with_option("fsdp", option), PLAN)


def test_refusal_names_every_set_option_and_its_default():
    cfg = cfg_for("fsdp", "parallelism.overlap_comm=true", "parallelism.reduce_bucket_size=500000000")
    with pytest.raises(ConfigError) as e:
        check(cfg, PLAN)
    msg = str(e.value)
    assert "parallelism.overlap_comm=True" in msg and "parallelism.reduce_bucket_size=500000000" in msg, msg
    assert "have no effect" in msg, msg
    assert "default: parallelism.overlap_comm=auto parallelism.reduce_bucket_size=-1" in msg, msg


@pytest.mark.parametrize("group", ["none", "zero2", "zero3"])
def test_reshard_after_forward_is_fsdp_only(group):
    if group != "none" and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed")
    want = (rf"parallelism\.reshard_after_forward=False has no effect under parallelism={group} "
            r"\(read by fsdp, hsdp only; ")
    with pytest.raises(ConfigError, match=want):
        check(with_option(group, "reshard_after_forward"), PLAN)


@needs_deepspeed
@pytest.mark.parametrize("option", ["prefetch_bucket_size", "param_persistence_threshold"])
def test_zero3_options_refused_under_zero2(option):
    want = (rf"parallelism\.{option}=\d+ has no effect under parallelism=zero2 "
            r"\(read by zero3 only; use parallelism=zero3\)")
    with pytest.raises(ConfigError, match=want):
        check(with_option("zero2", option), PLAN)
    check(with_option("zero3", option), PLAN)  # read by ZeRO-3


@needs_deepspeed
def test_offload_params_needs_zero3():
    with pytest.raises(ConfigError, match=r"offload_params=True has no effect under parallelism=zero2 \(read by "
                                          r"zero3 only; ZeRO-2 keeps whole weights on every GPU; "
                                          r"use parallelism=zero3_offload\)"):
        check(with_option("zero2", "offload_params"), PLAN)


@needs_deepspeed
def test_fp16_needs_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = cfg_for("zero3", "train.precision=fp16")
    assert cfg.train.precision == Precision.fp16
    with pytest.raises(ConfigError, match=r"train\.precision=fp16 with DeepSpeed needs a CUDA device"):
        check(cfg, PLAN)


@needs_deepspeed
def test_conflicting_override_is_refused_by_check():
    cfg = cfg_for("zero2", "+parallelism.deepspeed_overrides.gradient_clipping=5.0")
    with pytest.raises(ConfigError, match=r"deepspeed_overrides\.gradient_clipping=5\.0 .*train\.max_grad_norm"):
        check(cfg, PLAN)
