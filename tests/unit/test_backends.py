"""The backend registry (fft_dist.strategy.backend): every backend is one descriptor; parallelism=hsdp's
checks and sizing come from its own; and a backend defined under tests/ registers through the same point
and runs once, end to end (tests/support/toy_backend.py + tests/support/toy_conf/parallelism/toy.yaml)."""
from __future__ import annotations

import pytest
import yaml

from helpers import REPO
from fft_dist.compose import compose, to_typed
from fft_dist.config import BatchPlan, ConfigError, Parallelism
from fft_dist.memory import BACKENDS, ModelShape, estimate, estimate_table, setup_for
from fft_dist.planner import _overrides, candidates, comm_volume
from fft_dist.strategy import check
from fft_dist.strategy.backend import backends


def typed(*overrides: str):
    return to_typed(compose(["train.precision=fp32", *overrides]))


def shape(psi: int = 1_000_000) -> ModelShape:
    return ModelShape(params=psi, trainable=psi, hidden=64, layers=2, intermediate=128, kv_hidden=32, heads=4,
                      vocab=256, gated_mlp=True, largest_layer=psi // 4, largest_module=psi // 8, root_params=psi // 2,
                      param_sizes=(64, 64, psi - 128))


def test_every_builtin_backend_has_a_yaml_and_an_enum_name():
    builtin = [b.name for b in backends() if b.strategy.startswith("fft_dist.")]
    assert builtin == ["none", "fsdp", "hsdp", "zero2", "zero3"]
    for b in backends():
        if b.strategy.startswith("fft_dist."):
            assert yaml.safe_load((REPO / "conf" / "parallelism" / f"{b.name}.yaml").read_text())["name"] == b.name
            assert Parallelism(b.name).value == b.name
            for row in b.rows:
                assert (REPO / "conf" / "parallelism" / f"{row.name}.yaml").is_file()
    assert BACKENDS == ("none", "fsdp", "zero2", "zero3", "zero2_offload", "zero3_offload")


@pytest.mark.parametrize("shard,world,message", [
    ("3", 4, r"parallelism\.shard_size=3 does not divide the world size 4; use one of \[1, 2, 4\]"),
    ("0", 4, r"parallelism\.shard_size=0 must be >= 1, or -1 \(the ranks of one node\)"),
    ("-2", 4, r"parallelism\.shard_size=-2 must be >= 1"),
])
def test_shard_size_must_divide_the_world(shard, world, message):
    cfg = typed("parallelism=hsdp", f"parallelism.shard_size={shard}", f"launcher.nproc_per_node={world}")
    with pytest.raises(ConfigError, match=message):
        check(cfg, BatchPlan(world, 1, 1, world))


def test_shard_size_auto_is_one_node():
    cfg = typed("parallelism=hsdp", "launcher.nproc_per_node=3")
    check(cfg, BatchPlan(6, 1, 1, 6))  # 2 nodes x 3 ranks
    with pytest.raises(ConfigError, match=r"shard_size=3 \(auto: the 3 ranks of one node\) does not divide the world size 4"):
        check(cfg, BatchPlan(4, 1, 1, 4))


@pytest.mark.parametrize("group", ["none", "fsdp"])
def test_shard_size_is_refused_outside_hsdp(group):
    cfg = typed(f"parallelism={group}", "parallelism.shard_size=2")
    with pytest.raises(ConfigError, match=rf"parallelism\.shard_size=2 has no effect under parallelism={group} "
                                          r"\(read by hsdp only; use parallelism=hsdp\)"):
        check(cfg, BatchPlan(1 if group == "none" else 2, 1, 1, 2))


def test_hsdp_refuses_what_fsdp_refuses():
    with pytest.raises(ConfigError, match="offload_optimizer=True has no effect under parallelism=hsdp"):
        check(typed("parallelism=hsdp", "parallelism.offload_optimizer=true"), BatchPlan(2, 1, 1, 2))
    with pytest.raises(ConfigError, match="fused with optimizer=sgd does not run under parallelism=hsdp"):
        check(typed("parallelism=hsdp", "optimizer=sgd", "optimizer.implementation=fused"), BatchPlan(2, 1, 1, 2))


def test_estimate_sizes_hsdp_as_fsdp_over_one_group():
    """hsdp rows appear when the config chooses hsdp; their states are fsdp's at shard_size GPUs."""
    cfg = typed("parallelism=hsdp", "parallelism.shard_size=2")
    s = shape()
    rows = estimate_table(cfg, s, [1, 3, 4, 8])
    hsdp = {r["gpus"]: r for r in rows if r["parallelism"] == "hsdp"}
    assert sorted(hsdp) == [4, 8]  # 2 divides neither 1 nor 3
    fsdp2 = estimate(s, cfg, setup_for(cfg, "fsdp", 2))
    for row in hsdp.values():
        assert row["shard_size"] == 2 and row["per_gpu_bytes"] == fsdp2["per_gpu_bytes"]
    assert [r["parallelism"] for r in estimate_table(typed(), s, [4])] == list(BACKENDS[1:])  # fsdp: as before


def test_plan_knows_hsdp_from_its_descriptor():
    assert comm_volume("hsdp", 4) == 13 and comm_volume("zero2_offload", 4) == 5
    cfg = typed("parallelism=hsdp", "parallelism.shard_size=4", "train.global_batch_size=16")
    hsdp = [s for _, s, _ in candidates(cfg, 8) if s.parallelism == "hsdp"]
    assert hsdp and {s.shard_size for s in hsdp} == {4}
    assert "parallelism.shard_size=4" in _overrides(cfg, hsdp[0])
    assert not any(s.parallelism == "hsdp" for _, s, _ in candidates(typed(), 8))  # only when chosen
    assert not any(s.parallelism == "hsdp" for _, s, _ in candidates(cfg, 1))  # one GPU: nothing to shard
