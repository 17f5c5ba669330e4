"""MFU (issue 17): the trainer's and bench/gpu.py's FLOPs per token are torchtitan's (embeddings left
out, attention added, MoE experts by the share a token visits), over the dense bf16 peak of the
device the name says, H100 PCIe and SXM told apart."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from fft_dist.metrics import PEAK_BF16_FLOPS, attention_flops_per_token, device_peak, flops_per_token, matmul_params


def meta_model(config_class: str, **kw):
    config = getattr(transformers, config_class)(**kw)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), config


TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)


def test_llama_flops_per_token_is_torchtitans():
    """bench/gpu.py's 1.1B model: 6 x (all parameters less the input embedding) + 12 L H Q T. The old
    6N + 12 L d T counted the 65.5M embedding rows (6% of N) as matmuls: 5.4% too high at T=2048."""
    model, config = meta_model("LlamaConfig", **TINYLLAMA)
    n = sum(p.numel() for p in model.parameters())
    assert n == 1_100_048_384
    assert matmul_params(model, config) == n - 32000 * 2048  # lm_head stays: it is a matmul
    expected = 6 * (n - 32000 * 2048) + 12 * 22 * 32 * 64 * 2048
    assert flops_per_token(model, config, 2048) == expected
    old = 6 * n + 12 * 22 * 2048 * 2048
    assert old / expected - 1 == pytest.approx(0.054, abs=0.001)


def test_tied_head_counts_and_positions_do_not():
    """A tied embedding is also the output head's matrix, so it counts; GPT-2's learned positions are a
    lookup only."""
    model, config = meta_model("GPT2Config", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    n = sum(p.numel() for p in model.parameters())
    assert config.tie_word_embeddings
    assert matmul_params(model, config) == n - 128 * 64


def test_moe_experts_count_by_the_share_a_token_visits():
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model, config = meta_model("MixtralConfig", **kw)
    experts = sum(p.numel() for name, m in model.named_modules() if name.endswith(".experts") for p in m.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert experts > 0
    assert matmul_params(model, config) == n - 256 * 64 - experts + experts * 2 // 4


def test_sliding_window_layers_attend_to_their_window():
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    _, mistral = meta_model("MistralConfig", **kw, sliding_window=16)
    assert attention_flops_per_token(mistral, 1024) == 12 * 4 * 16 * 16 * 2  # every layer: window 16
    _, gemma2 = meta_model("Gemma2Config", **kw, head_dim=16, sliding_window=16)  # alternating
    assert attention_flops_per_token(gemma2, 1024) == 12 * 4 * 16 * (16 + 1024)
    _, llama = meta_model("LlamaConfig", **kw)
    assert attention_flops_per_token(llama, 1024) == 12 * 2 * 4 * 16 * 1024


@pytest.mark.parametrize("name,part,tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989), ("NVIDIA H100 PCIe", "H100 PCIe", 756),
    ("NVIDIA H100 NVL", "H100 NVL", 835), ("NVIDIA H200", "H200 SXM", 989), ("NVIDIA H200 NVL", "H200 NVL", 835),
    ("NVIDIA GH200 480GB", "GH200", 989), ("NVIDIA A100-SXM4-80GB", "A100 SXM", 312),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", 312), ("NVIDIA A100-PCIE-40GB", "A100 PCIe", 312),
    ("NVIDIA L40S", "L40S", 362), ("NVIDIA L4", "L4", 121),
])
def test_peak_by_device_name(name, part, tflops):
    assert device_peak(name) == (part, tflops * 1e12)


def test_unknown_devices_have_no_peak():
    """No guessed MFU: an L40 is not an L4 or an L40S, a V100 is not in the table."""
    for name in ("NVIDIA L40", "Tesla V100-SXM2-16GB", "NVIDIA B200", "cpu"):
        assert device_peak(name) is None, name
    assert all(flops < 2e15 for _, _, flops in PEAK_BF16_FLOPS)  # dense figures, not the sparse ones
