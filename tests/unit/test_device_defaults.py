"""GPU defaults decided on the rank (issue 17): every `auto` (precision, determinism, TF32, the optimizer's
kernel, DeepSpeed's overlap_comm and bf16 weights) becomes today's behaviour on CPU and the fast setting on a
GPU; an explicit value always wins; anything else is exit 2 before launch. DeepSpeed's bf16 mode is the typed
option parallelism.bf16_weights (the override route is refused). The GPU is described, not present: the
decisions are pure, and torch's CUDA calls are stood in for where a function reads them."""
from __future__ import annotations

import types

import pytest
import torch

from fft_dist import device_defaults as dd
from fft_dist.compose import compose, resolve, to_typed
from fft_dist.config import ConfigError, OptimizerImplementation as Impl, Precision
from fft_dist.strategy import device_defaults, get
from fft_dist.validate import validate


H100 = dd.DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), True)


V100 = dd.DeviceInfo("cuda", "Tesla V100-SXM2-32GB", (7, 0), False)


BACKENDS = ("none", "fsdp", "zero2", "zero3", "zero2_offload", "zero3_offload")


def decide(cfg, device):
    """dd.decide for cfg's backend, with the DeepSpeed stage its descriptor gives (as on the rank)."""
    return dd.decide(cfg, device, deepspeed_stage=get(cfg.parallelism.name).deepspeed_stage)


def typed(*overrides: str):
    return to_typed(resolve(compose(list(overrides))))


@pytest.mark.parametrize("group", BACKENDS)
def test_auto_on_cpu_is_todays_behaviour(group):
    """fp32, deterministic kernels, no TF32, the single-tensor optimizer, overlap off, fp32 weights."""
    d = decide(typed(f"parallelism={group}"), dd.CPU)
    assert (d.precision, d.deterministic, d.tf32, d.optimizer_implementation) == (
        Precision.fp32, True, False, Impl.single_tensor)
    assert (d.overlap_comm, d.bf16_weights) == (False, False)
    assert {"train.precision", "train.deterministic", "optimizer.implementation"} <= set(d.auto)
    assert d.record()["event"] == "defaults" and d.record()["precision"] == "fp32"
    assert "resume is bitwise exact" in d.banner() and "TF32 n/a" in d.banner()


def test_auto_on_cpu_leaves_torch_and_the_optimizer_as_they_were(monkeypatch):
    from fft_dist.optim import optimizer_factory

    matmul = types.SimpleNamespace(fp32_precision="untouched")
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    d = device_defaults(typed(), torch.device("cpu"))
    assert matmul.fp32_precision == "untouched"
    opt = optimizer_factory(typed().optimizer, 1e-3, d.optimizer_implementation)(torch.nn.Linear(2, 2))
    assert opt.defaults["foreach"] is False and not opt.defaults["fused"]  # the loop every parity test used


def test_auto_on_a_gpu_is_the_fast_setting():
    for group, overlap in (("zero3", True), ("zero2", False), ("zero3_offload", True)):
        d = decide(typed(f"parallelism={group}"), H100)
        assert (d.precision, d.deterministic, d.tf32, d.optimizer_implementation) == (
            Precision.bf16, False, True, Impl.fused)
        assert d.overlap_comm is overlap and d.bf16_weights is True  # DeepSpeed's stage default; its bf16 mode
        assert ("resume is exact up to GPU kernel non-determinism; train.deterministic=true makes it bitwise"
                in d.banner())
        assert "sm_90" in d.banner() and d.record()["overlap_comm"] is overlap
    fsdp = decide(typed("parallelism=fsdp"), H100)
    assert "overlap_comm" not in fsdp.record() and fsdp.bf16_weights is False
    assert decide(typed("optimizer=sgd"), H100).optimizer_implementation == Impl.foreach  # no sharded fused SGD
    old = decide(typed("parallelism=zero3"), V100)  # no bf16: fp32, so no bf16 weights either
    assert (old.precision, old.bf16_weights, old.tf32) == (Precision.fp32, False, True)


def test_an_explicit_value_always_wins():
    explicit = ["train.precision=fp32", "train.deterministic=true", "parallelism.overlap_comm=false",
                "parallelism.bf16_weights=false", "optimizer.implementation=single_tensor"]
    d = decide(typed("parallelism=zero3", *explicit), H100)
    assert (d.precision, d.deterministic, d.tf32, d.optimizer_implementation, d.overlap_comm, d.bf16_weights) == (
        Precision.fp32, True, False, Impl.single_tensor, False, False)
    assert d.auto == () and "resume is bitwise exact" in d.banner()
    cpu = decide(typed("parallelism=zero2", "train.deterministic=false", "parallelism.overlap_comm=true",
                          "parallelism.bf16_weights=true", "optimizer.implementation=fused"), dd.CPU)
    assert (cpu.precision, cpu.deterministic, cpu.tf32, cpu.overlap_comm, cpu.bf16_weights) == (
        Precision.bf16, False, False, True, True)  # bf16 weights imply bf16; TF32 exists on CUDA only
    assert cpu.optimizer_implementation == Impl.fused
    gpu = decide(typed("train.precision=bf16", "parallelism=zero2", "train.deterministic=false"), H100)
    assert gpu.tf32 and gpu.bf16_weights and gpu.auto == ("optimizer.implementation", "parallelism.overlap_comm",
                                                          "parallelism.bf16_weights")


@pytest.mark.parametrize("override, message", [
    ("train.deterministic=sometimes", "train.deterministic='sometimes': use true, false or auto"),
    ("parallelism.overlap_comm=yes", "parallelism.overlap_comm='yes': use true, false or auto"),
    ("train.precision=fp32 parallelism.bf16_weights=true", "parallelism.bf16_weights=true keeps bf16 weights, "
                                                           "but train.precision=fp32"),
    ("optimizer=sgd optimizer.implementation=fused", "does not run under parallelism=fsdp"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        validate(typed(*override.split()), 2)
    assert message in str(e.value)


def test_estimate_refuses_a_bad_toggle_with_exit_2(capsys):
    from fft_dist import cli

    assert cli.estimate(["parallelism.overlap_comm=often"]) == 2
    assert "parallelism.overlap_comm='often': use true, false or auto" in capsys.readouterr().err


def test_true_and_false_are_typed_as_users_type_them():
    """Hydra gives a bool for true/false and a string for auto; both fit the field, and they stay what they were."""
    cfg = typed("train.deterministic=false", "parallelism=zero2", "parallelism.overlap_comm=true")
    assert cfg.train.deterministic is False and cfg.parallelism.overlap_comm is True
    assert typed().train.deterministic == "auto" and dd.toggle("True", "x") is True and dd.toggle("auto", "x") is None


def test_describe_reads_the_rank_s_gpu(monkeypatch):
    assert dd.describe(torch.device("cpu")) == dd.CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    info = dd.describe(torch.device("cuda", 0))
    assert info == dd.DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), True)


def test_tf32_follows_determinism_on_cuda(monkeypatch):
    matmul, conv = types.SimpleNamespace(fp32_precision="none"), types.SimpleNamespace(fp32_precision="none")
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends.cudnn, "conv", conv)
    dd.apply(decide(typed(), H100))
    assert matmul.fp32_precision == conv.fp32_precision == "tf32"
    dd.apply(decide(typed("train.deterministic=true"), H100))
    assert matmul.fp32_precision == conv.fp32_precision == "ieee"


def test_gpu_memory_metrics_are_per_step_peaks(monkeypatch):
    from fft_dist.metrics import peak_memory_mb

    assert set(peak_memory_mb(torch.device("cpu"))) == {"peak_mem_mb"}  # CPU: today's RSS field
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    cuda = torch.device("cuda", 0)
    assert peak_memory_mb(cuda) == {"peak_mem_mb": 3.0, "peak_mem_reserved_mb": 5.0} and resets == [cuda]


def test_estimate_takes_auto_as_a_gpu_with_bf16_and_counts_bf16_weights():
    from fft_dist.memory import Setup, assumptions, estimate, model_shape

    auto = typed("parallelism=zero3")
    shape = model_shape(auto)
    row = lambda cfg, backend: estimate(shape, cfg, Setup(backend, 4, 1, 16, False))["per_gpu_bytes"]  # noqa: E731
    native = typed("parallelism=zero3", "train.precision=bf16", "parallelism.bf16_weights=true")
    autocast = typed("parallelism=zero3", "train.precision=bf16", "parallelism.bf16_weights=false")
    for backend in ("zero2", "zero3"):
        assert row(auto, backend) == row(native, backend) != row(autocast, backend)
        assert row(native, backend)["params"] < row(autocast, backend)["params"]  # 2-byte working weights
    assert "precision bf16 (auto: as on a GPU with bf16), ZeRO rows with bf16 weights" in assumptions(auto)
    assert assumptions(typed("train.precision=fp32")) == "precision fp32"
    override = typed("parallelism=zero3", "train.precision=bf16", "+parallelism.deepspeed_overrides.bf16.enabled=true",
                     "parallelism.bf16_weights=false")
    assert row(override, "zero3") == row(autocast, "zero3")  # the refused override route is not counted
