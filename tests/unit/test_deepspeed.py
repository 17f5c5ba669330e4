"""DeepSpeed ZeRO-2 / ZeRO-3 behind the Strategy protocol (issue 3), in this process: build_deepspeed_config's
keys, bucket sizes, precision, offload, overrides and their errors, and the shapes the decay split sees (the
refusals of check() are in tests/unit/test_strategy_check.py; the parity matrix, the resumes, the memory and
the launchers on real ranks are in tests/e2e/test_deepspeed.py)."""
from __future__ import annotations

import sys

import pytest
import torch

from fft_dist.compose import compose, to_typed
from fft_dist.config import (BatchPlan, ConfigError, ModelConfig, Parallelism, ParallelismConfig, Precision,
    TrainConfig)
from fft_dist.strategy.deepspeed_config import build_deepspeed_config, hidden_size_of
from deepspeed_shared import check


# =============================================================================================
# (a) the DeepSpeed config dict: pure, no processes
# =============================================================================================
PLAN = BatchPlan(world_size=2, micro_batch_size=2, grad_accum=3, global_batch_size=12)


def par(name: str = "zero2", **kw) -> ParallelismConfig:
    return ParallelismConfig(name=Parallelism(name), **kw)


def test_config_zero2_keys():
    p = par("zero2", reduce_bucket_size=123, allgather_bucket_size=456, overlap_comm=True, contiguous_gradients=False)
    cfg = build_deepspeed_config(p, TrainConfig(max_grad_norm=0.5), PLAN)
    assert cfg["train_batch_size"] == 12
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    z = cfg["zero_optimization"]
    assert z["stage"] == 2 and z["overlap_comm"] is True and z["contiguous_gradients"] is False
    assert z["reduce_bucket_size"] == 123 and z["allgather_bucket_size"] == 456
    assert "offload_optimizer" not in z and "offload_param" not in z
    assert not any(k.startswith("stage3_") for k in z)
    assert cfg["zero_allow_untested_optimizer"] is True and cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["steps_per_print"] >= 2**40 and cfg["wall_clock_breakdown"] is False
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours: client torch optimizer, our schedule


def test_config_zero3_keys_and_offload():
    p = par("zero3", reduce_bucket_size=11, allgather_bucket_size=22, prefetch_bucket_size=33,
            param_persistence_threshold=44, offload_optimizer=True, offload_params=True)
    z = build_deepspeed_config(p, TrainConfig(), PLAN)["zero_optimization"]
    assert z["stage"] == 3
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (11, 33, 44)
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"


def test_config_defaults_are_cpu_sized_on_cpu_and_model_sized_on_gpu():
    """The shipped yaml groups say auto (-1): on CPU the ~2e6 buckets and threshold 0 that CPU runs need
    (CPU-FACTS); on GPU DeepSpeed's Hugging Face "auto" from the hidden size (tiny_llama: 128)."""
    for group, stage, opt, params in [("zero2", 2, False, False), ("zero3", 3, False, False),
                                      ("zero2_offload", 2, True, False), ("zero3_offload", 3, True, True)]:
        cfg = to_typed(compose([f"parallelism={group}"]))
        assert cfg.parallelism.reduce_bucket_size == -1, group
        hidden = hidden_size_of(cfg.model)
        assert hidden == 128
        plan = BatchPlan(2, 4, 2, 16)
        z = build_deepspeed_config(cfg.parallelism, cfg.train, plan, hidden_size=hidden, on_gpu=False)["zero_optimization"]
        assert z["stage"] == stage, group
        assert z["reduce_bucket_size"] == 2_000_000 and z["allgather_bucket_size"] == 2_000_000
        if stage == 3:
            assert z["stage3_prefetch_bucket_size"] == 2_000_000 and z["stage3_param_persistence_threshold"] == 0
        assert ("offload_optimizer" in z) == opt and ("offload_param" in z) == params, group
        g = build_deepspeed_config(cfg.parallelism, cfg.train, plan, hidden_size=hidden, on_gpu=True)["zero_optimization"]
        assert g["reduce_bucket_size"] == 128 * 128 and g["allgather_bucket_size"] == 500_000_000
        if stage == 3:
            assert g["stage3_prefetch_bucket_size"] == int(0.9 * 128 * 128)
            assert g["stage3_param_persistence_threshold"] == 10 * 128
        else:
            assert not any(k.startswith("stage3_") for k in g)
    # the default on this machine (no CUDA) is the CPU one, through the same path the launcher takes
    cfg = to_typed(compose(["parallelism=zero3"]))
    z = build_deepspeed_config(cfg.parallelism, cfg.train, BatchPlan(2, 4, 2, 16))["zero_optimization"]
    want = 2_000_000 if not torch.cuda.is_available() else 128 * 128
    assert z["reduce_bucket_size"] == want


def test_config_gpu_auto_buckets_follow_the_model_and_set_values_win():
    """auto scales with the model (llama3_8b: hidden 4096); explicit values beat auto on both devices;
    an unknown hidden size on GPU falls back to DeepSpeed's own defaults; nonsense sizes are refused."""
    cfg = to_typed(compose(["parallelism=zero3", "model=llama3_8b"]))
    z = build_deepspeed_config(cfg.parallelism, cfg.train, PLAN, hidden_size=hidden_size_of(cfg.model),
                               on_gpu=True)["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
        4096 * 4096, int(0.9 * 4096 * 4096), 40960)
    p = par("zero3", reduce_bucket_size=7, prefetch_bucket_size=9, param_persistence_threshold=0)
    for on_gpu in (False, True):
        z = build_deepspeed_config(p, TrainConfig(), PLAN, hidden_size=4096, on_gpu=on_gpu)["zero_optimization"]
        assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
            7, 9, 0)
        assert z["allgather_bucket_size"] == (500_000_000 if on_gpu else 2_000_000)  # still auto
    z = build_deepspeed_config(par("zero3"), TrainConfig(), PLAN, hidden_size=None, on_gpu=True)["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
        500_000_000, 50_000_000, 100_000)
    for bad in ({"reduce_bucket_size": 0}, {"prefetch_bucket_size": -5}, {"param_persistence_threshold": -2}):
        with pytest.raises(ConfigError, match=f"parallelism.{next(iter(bad))}=.*-1 for auto"):
            build_deepspeed_config(par("zero3", **bad), TrainConfig(), PLAN, hidden_size=64, on_gpu=False)
    assert hidden_size_of(ModelConfig(arch={"model_type": "gpt2", "n_embd": 768})) == 768
    assert hidden_size_of(ModelConfig(arch={})) is None


def test_config_bf16_is_autocast_over_fp32_weights():
    """bf16 = fp32 weights + bf16 autocast compute + fp32 reductions (the `none` semantics), not DeepSpeed's
    bf16 mode whose fp32 master starts from the bf16-rounded weights."""
    cfg = build_deepspeed_config(par(), TrainConfig(precision=Precision.bf16), PLAN)
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def test_config_bf16_weights_is_a_typed_option():
    """parallelism.bf16_weights=true: DeepSpeed's own bf16 mode with bf16 communication; the old override
    route is refused, naming the option; auto is the GPU's choice (bf16 under bf16) and fp32 weights on CPU."""
    for stage in ("zero2", "zero3"):
        cfg = build_deepspeed_config(par(stage, bf16_weights=True), TrainConfig(precision=Precision.bf16), PLAN)
        assert cfg["bf16"]["enabled"] is True and cfg["communication_data_type"] == "bf16"
        assert "torch_autocast" not in cfg
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True .* Use parallelism\.bf16_weights=true\|false"):
        build_deepspeed_config(par("zero3", deepspeed_overrides={"bf16": {"enabled": True}}),
                               TrainConfig(precision=Precision.bf16), PLAN, on_gpu=False)
    for key in ({"communication_data_type": "fp32"}, {"data_types": {"grad_accum_dtype": "fp32"}}):
        with pytest.raises(ConfigError, match="parallelism.bf16_weights"):
            build_deepspeed_config(par("zero3", bf16_weights=True, deepspeed_overrides=key),
                                   TrainConfig(precision=Precision.bf16), PLAN)
    auto = par("zero3")  # bf16_weights=auto, overlap_comm=auto, precision=auto
    gpu = build_deepspeed_config(auto, TrainConfig(), PLAN, on_gpu=True)
    assert gpu["bf16"]["enabled"] is True and gpu["zero_optimization"]["overlap_comm"] is True
    cpu = build_deepspeed_config(auto, TrainConfig(), PLAN, on_gpu=False)
    assert cpu["bf16"]["enabled"] is False and "torch_autocast" not in cpu and "communication_data_type" not in cpu
    assert cpu["zero_optimization"]["overlap_comm"] is False


def test_config_fp16_uses_dynamic_loss_scaling():
    cfg = build_deepspeed_config(par(), TrainConfig(precision=Precision.fp16), PLAN)
    assert cfg["fp16"]["enabled"] is True and cfg["fp16"]["loss_scale"] == 0
    assert "torch_autocast" not in cfg and cfg["bf16"]["enabled"] is False


def test_overrides_deep_merge():
    p = par("zero3", deepspeed_overrides={
        "zero_optimization": {"sub_group_size": 1000, "reduce_bucket_size": 2_000_000},  # same value: fine
        "gradient_clipping": 1,  # same value as train.max_grad_norm=1.0
        "comms_logger": {"enabled": False},
        "steps_per_print": 10,  # logging keys are ours by default only
    })
    cfg = build_deepspeed_config(p, TrainConfig(), PLAN, on_gpu=False)  # CPU auto: 2e6
    assert cfg["zero_optimization"]["sub_group_size"] == 1000
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["reduce_bucket_size"] == 2_000_000
    assert cfg["comms_logger"] == {"enabled": False} and cfg["steps_per_print"] == 10


def test_overrides_accept_omegaconf_containers():
    cfg = to_typed(compose(["parallelism=zero2", "+parallelism.deepspeed_overrides.zero_optimization.round_robin_gradients=true"]))
    ds = build_deepspeed_config(cfg.parallelism, cfg.train, BatchPlan(2, 4, 2, 16))
    assert ds["zero_optimization"]["round_robin_gradients"] is True and ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    "override, key, option",
    [
        ({"gradient_clipping": 5.0}, "gradient_clipping", "train.max_grad_norm"),
        ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps", "train.global_batch_size"),
        ({"bf16": {"enabled": True}}, "bf16.enabled", "parallelism.bf16_weights"),
        ({"torch_autocast": {"enabled": True}}, "torch_autocast.enabled", "train.precision"),
        ({"fp16": True}, "fp16", "train.precision"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "parallelism=zero2|zero3"),
        ({"zero_optimization": {"reduce_bucket_size": 5e8}}, "zero_optimization.reduce_bucket_size",
         "parallelism.reduce_bucket_size"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer",
         "parallelism.offload_optimizer"),
        ({"zero_optimization": {"stage3_prefetch_bucket_size": 10}}, "zero_optimization.stage3_prefetch_bucket_size",
         "parallelism.prefetch_bucket_size"),
        ({"optimizer": {"type": "Adam"}}, "optimizer", "optimizer"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "train.lr_schedule"),
    ],
)
def test_conflicting_override_names_key_and_option(override, key, option):
    with pytest.raises(ConfigError) as e:
        build_deepspeed_config(par("zero2", deepspeed_overrides=override), TrainConfig(), PLAN)
    msg = str(e.value)
    assert f"deepspeed_overrides.{key}" in msg and option in msg, msg


def test_not_a_zero_stage():
    with pytest.raises(ConfigError, match="zero2"):
        build_deepspeed_config(par("fsdp"), TrainConfig(), PLAN)


def test_missing_deepspeed_names_install_command(monkeypatch):
    """Reported by check() in the launcher, before any rank starts."""
    from fft_dist.strategy import check

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec -> None, `import deepspeed` -> ImportError
    cfg = to_typed(compose(["parallelism=zero2"]))
    with pytest.raises(ConfigError, match=r"parallelism=zero2 needs DeepSpeed.*pip install --no-build-isolation"):
        check(cfg, BatchPlan(2, 4, 2, 16))


def test_full_shapes_lets_the_decay_split_see_real_shapes():
    """Under zero.Init every weight is an empty 1-D placeholder; param_groups decides decay on ndim."""
    from torch import nn

    from fft_dist.config import OptimizerConfig
    from fft_dist.optim import param_groups
    from fft_dist.strategy.deepspeed_compat import full_shapes

    model = nn.Linear(4, 3)
    for p in model.parameters():
        p.ds_shape = tuple(p.shape)
        p.data = torch.empty(0)
    with full_shapes(list(model.parameters())):
        groups = param_groups(model, OptimizerConfig())
        assert model.weight.shape == (3, 4)
    assert model.weight.shape == (0,)
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[0]["params"][0] is model.weight
