"""`fft_dist.memory` and `fft-dist estimate` (issue 11): the formulas, the seeds' worked 7B example,
DeepSpeed's own estimators where they overlap, and the command's output (pure: no ranks).

The comparison with per-rank bytes measured on real processes is tests/e2e/test_memory_measured.py.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from fft_dist import cli
from fft_dist.compose import compose, resolve, to_typed
from fft_dist.config import Precision
from fft_dist.memory import (BACKENDS, ModelShape, Setup, activation_bytes, estimate, estimate_table,
    eval_activation_bytes, limit, model_shape, model_state_bytes)


# Llama-2 7B's shape (MHA, SwiGLU 11008, vocab 32000) from the Llama 3 8B group
LLAMA2_7B = ["model=llama3_8b", "model.arch.vocab_size=32000", "model.arch.intermediate_size=11008",
             "model.arch.num_key_value_heads=32", "model.arch.max_position_embeddings=4096"]


def typed(*overrides: str):
    """fp32 unless a test names a precision: these are the fp32 layouts (auto would be bf16, as a GPU decides)."""
    pinned = [] if any(o.startswith("train.precision=") for o in overrides) else ["train.precision=fp32"]
    return to_typed(resolve(compose([*pinned, *overrides])))


@pytest.fixture(scope="module")
def llama7b():
    cfg = typed(*LLAMA2_7B, "data.max_length=2048", "train.micro_batch_size=1")
    return cfg, model_shape(cfg)


def test_meta_build_reads_the_real_model(llama7b):
    _, shape = llama7b
    assert shape.params == 6_738_415_616  # Llama-2 7B's published parameter count
    assert shape.trainable == shape.params
    assert (shape.hidden, shape.layers, shape.intermediate, shape.kv_hidden, shape.vocab) == (4096, 32, 11008, 4096, 32000)
    assert shape.gated_mlp
    assert shape.largest_layer == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention + MLP + 2 norms
    assert shape.largest_module == 32000 * 4096  # the embedding (or lm_head): ZeRO-3's largest gather
    assert shape.root_params == 2 * 32000 * 4096 + 4096


def test_seed_worked_7b_fp32_example(llama7b):
    """The seeds: 7B in fp32 = 28 GB weights + 28 GB grads + 56 GB Adam + ~20 GB activations = ~132 GB.

    With Ψ = 7e9 exactly the model states are exact. The ~20 GB of activations come out for micro
    batch 1 x 2048 tokens, fp32, sdpa attention (no s x s scores), no checkpointing: 32 layers x 2048
    tokens x (6h + 2h_kv + 4i = 76,800 elements) x 4 B = 20.1 GB, plus 0.5 GB of logits and their
    log-softmax. The real Llama-2 7B (Ψ = 6.74e9) lands within 5% of every seed number.
    """
    cfg, shape = llama7b
    row = estimate(dataclasses.replace(shape, params=7_000_000_000, trainable=7_000_000_000), cfg,
                   Setup("none", 1, 1, 2048, False))
    b = row["per_gpu_bytes"]
    assert (b["params"], b["grads"], b["optimizer"], b["master"]) == (28e9, 28e9, 56e9, 0)
    assert b["activations"] == pytest.approx(20e9, rel=0.05)
    assert b["total"] == pytest.approx(132e9, rel=0.02)
    real = estimate(shape, cfg, Setup("none", 1, 1, 2048, False))["per_gpu_bytes"]
    for key, seed in (("params", 28e9), ("grads", 28e9), ("optimizer", 56e9), ("activations", 20e9), ("total", 132e9)):
        assert real[key] == pytest.approx(seed, rel=0.05), key


def synthetic(psi: int = 1_000_000, **kw) -> ModelShape:
    base = dict(params=psi, trainable=psi, hidden=64, layers=2, intermediate=128, kv_hidden=32, heads=4, vocab=256,
                gated_mlp=True, largest_layer=psi // 4, largest_module=psi // 8, root_params=psi // 2,
                param_sizes=(64, 64, psi - 128))
    base.update(kw)
    return ModelShape(**base)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_fp32_model_states_are_the_readme_table(n):
    """README Backends: none 16Ψ, fsdp 16Ψ/N, zero2 4Ψ + 16Ψ/N (+ half the largest parameter of gradient
    straddling the partition ends), zero3 20Ψ/N (+ the reduce bucket, kept as a buffer); SGD with momentum replaces Adam's 8 bytes by 4, plain SGD by 0."""
    psi = 1_000_000 * 8
    shape = synthetic(psi, param_sizes=(psi,))
    cfg = typed()
    states = {b: model_state_bytes(estimate(shape, cfg, Setup(b, n, 1, 16, False))) for b in BACKENDS}
    assert states["none"] == 16 * psi
    assert states["fsdp"] == 16 * psi // n
    assert states["zero2"] == 4 * psi + 16 * psi // n + 4 * (min(psi, psi // n + psi // 2) - psi // n)  # + straddle
    many = synthetic(psi, param_sizes=(1000,) * (psi // 1000))
    assert model_state_bytes(estimate(many, cfg, Setup("zero2", n, 1, 16, False))) == \
        4 * psi + 16 * psi // n + (4 * 500 if n > 1 else 0)
    assert states["zero3"] == 20 * psi // n
    sgd = typed("optimizer=sgd")
    assert estimate(shape, sgd, Setup("none", 1, 1, 16, False))["per_gpu_bytes"]["optimizer"] == 4 * psi
    plain = typed("optimizer=sgd", "optimizer.momentum=0")
    assert estimate(shape, plain, Setup("none", 1, 1, 16, False))["per_gpu_bytes"]["optimizer"] == 0


def test_zero3_persistence_threshold_keeps_small_params_whole():
    """Auto on GPU: threshold 10 x hidden; parameters below it (norms, biases) are whole on every rank."""
    shape = synthetic(8_000_000, param_sizes=(64, 64, 100, 8_000_000 - 228))
    row = estimate(shape, typed(), Setup("zero3", 4, 1, 16, False))
    assert row["detail"]["persistent_params"] == 228
    assert row["detail"]["reduce_bucket"] == 64 * 64 * 4 and row["detail"]["prefetch_bucket"] == int(0.9 * 64 * 64) * 4
    assert row["per_gpu_bytes"]["params"] == 4 * ((8_000_000 - 228) // 4 + 228)
    manual = typed("parallelism=zero3", "parallelism.param_persistence_threshold=0")
    assert estimate(shape, manual, Setup("zero3", 4, 1, 16, False))["detail"]["persistent_params"] == 0


def test_offload_moves_states_to_cpu():
    psi, n = 8_000_000, 4
    shape = synthetic(psi, param_sizes=(psi,))
    cfg = typed()
    z2 = estimate(shape, cfg, Setup("zero2_offload", n, 1, 16, False))
    assert (z2["per_gpu_bytes"]["params"], z2["per_gpu_bytes"]["optimizer"]) == (4 * psi, 0)
    assert z2["cpu_bytes_per_gpu"] == 16 * psi // n  # master + fp32 grads + Adam
    z3 = estimate(shape, cfg, Setup("zero3_offload", n, 1, 16, False))
    assert z3["per_gpu_bytes"]["params"] == 0 and z3["cpu_bytes_per_gpu"] == 20 * psi // n


def test_activations_formula_and_checkpointing():
    shape = synthetic(vocab=1000, hidden=64, kv_hidden=32, intermediate=128, layers=3)
    b, s = 2, 10
    per_layer = b * s * (6 * 64 + 2 * 32 + 4 * 128) * 4
    logits = b * s * 1000 * 8
    assert activation_bytes(shape, micro_batch=b, seq_len=s, checkpointing=False, precision=Precision.fp32) == \
        3 * per_layer + logits
    assert activation_bytes(shape, micro_batch=b, seq_len=s, checkpointing=True, precision=Precision.fp32) == \
        3 * b * s * 64 * 4 + per_layer + logits
    bf16 = activation_bytes(shape, micro_batch=b, seq_len=s, checkpointing=False, precision=Precision.bf16)
    assert bf16 == 3 * per_layer // 2 + b * s * 1000 * 10
    plain_mlp = dataclasses.replace(shape, gated_mlp=False)
    assert activation_bytes(plain_mlp, micro_batch=b, seq_len=s, checkpointing=False, precision=Precision.fp32) == \
        3 * b * s * (6 * 64 + 2 * 32 + 2 * 128) * 4 + logits
    eager = activation_bytes(shape, micro_batch=b, seq_len=s, checkpointing=False, precision=Precision.fp32,
                             eager_attention=True)
    assert eager == 3 * (per_layer + b * 4 * s * s * 4) + logits


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_deepspeed_estimators_where_they_overlap():
    """DeepSpeed's estimators assume its 16-bit mode (2-byte weights and gradients), so they are compared
    with train.precision=fp16 (zero.Init on, one node, additional_buffer_factor=1.5 on CPU numbers). The
    differences, each pinned exactly:
    - ZeRO-2 GPU: both 2Ψ + 18Ψ/N (16-bit weights; 16-bit + fp32 gradient partition, master, Adam), and
      we add half the largest parameter to the 16-bit gradients: DeepSpeed's gradient buffer runs to
      whole parameters at a partition's ends (measured, tests/e2e/test_memory_measured.py). Buckets are ours
      on top (DeepSpeed leaves them out).
    - ZeRO-3 GPU: DeepSpeed says 4 x largest layer + 18Ψ/N; we count the same largest-module gather
      (weights + gradients, 2 + 2 bytes) but 20Ψ/N: the 16-bit gradient partition stays allocated while
      the fp32 copy for the step exists, and DeepSpeed's ZeRO-3 estimate leaves one of them out.
    - Offload CPU: DeepSpeed = ours x 1.5 (its additional_buffer_factor for pinned buffers and
      fragmentation): ZeRO-2 16Ψ per node (master, fp32 gradients, Adam), ZeRO-3 18Ψ (plus the 16-bit
      parameter partition). Its `max(4 x gpus, 16)` term, the fp32 copy each rank builds without
      zero.Init, only matters for ZeRO-2 with more than 4 GPUs.
    - Offload GPU: ZeRO-2 both 2Ψ for the weights; ZeRO-3 DeepSpeed counts only the largest layer, we
      count it as 2 + 2 bytes of the largest module too (plus buckets and persistent parameters).
    - fp32 (fft-dist's default) is not covered by DeepSpeed: its numbers are then too small by 2Ψ for
      ZeRO-2's weights and by 2-4Ψ/N elsewhere; ours are the measured fp32 layouts.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi, largest = 7_000_000_000, 131_072_000
    shape = synthetic(psi, largest_module=largest, param_sizes=(largest,) * 53 + (psi - 53 * largest,))
    cfg = typed("train.precision=fp16")
    for n in (1, 2, 4, 8):
        row = {b: estimate(shape, cfg, Setup(b, n, 1, 16, False)) for b in ("zero2", "zero3", "zero2_offload", "zero3_offload")}
        cpu, gpu = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=n, cpu_offload=False)
        assert gpu + 2 * min(largest // 2, psi - psi // n) == model_state_bytes(row["zero2"])
        cpu, gpu = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=n, cpu_offload=True)
        assert gpu == model_state_bytes(row["zero2_offload"])
        ours_cpu = row["zero2_offload"]["cpu_bytes_per_gpu"] * n
        assert cpu == pytest.approx(1.5 * max(ours_cpu, 4 * n * psi), rel=1e-9)
        cpu, gpu, layer = estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=n, cpu_offload=False,
                                                                cpu_offload_params=False)
        assert layer == row["zero3"]["detail"]["gathered_layers"]
        assert gpu + 2 * psi // n == pytest.approx(model_state_bytes(row["zero3"]) + layer, abs=n)
        cpu, gpu, layer = estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=n)
        assert gpu == row["zero3_offload"]["detail"]["gathered_layers"]
        assert model_state_bytes(row["zero3_offload"]) == 0
        assert cpu == pytest.approx(1.5 * row["zero3_offload"]["cpu_bytes_per_gpu"] * n, rel=1e-6)


def test_estimate_table_marks_what_fits():
    cfg = typed()
    shape = synthetic(8_000_000)
    rows = estimate_table(cfg, shape, [1, 2], gpu_mem=10**9)
    assert [(r["parallelism"], r["gpus"]) for r in rows] == [(b, 1) for b in BACKENDS] + [(b, 2) for b in BACKENDS[1:]]
    assert all(r["fits"] == (r["per_gpu_bytes"]["total"] <= limit(10**9)) for r in rows)
    assert limit(10**9) == pytest.approx(0.9 * 0.9e9)  # 90% of the GPU, less 10% headroom
    tight = estimate_table(cfg, shape, [1], gpu_mem=int(model_state_bytes(rows[0]) * 1.3))
    assert tight[0]["fits"] is False  # none: states fit, activations do not


def test_cli_estimate_table_and_errors(capsys):
    """In-process (the same functions `main` dispatches to): the table, and exit 2 for bad input."""
    assert cli.estimate(["--gpus", "2", "--gpu-mem", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "fsdp" in out and "zero3_offload" in out and "yes" in out
    assert "none " not in out  # one process only: not offered at 2 GPUs
    assert cli.estimate(["--gpus", "0,2"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert cli.estimate(["train.micro_batch_sizee=3"]) == 2
    assert "micro_batch_sizee" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.estimate(["--gpu-mem", "lots"])
    assert e.value.code == 2 and "lots" in capsys.readouterr().err


def test_estimate_reads_model_path_config(tmp_path, capsys):
    """With model.path only config.json is read (no weights needed): the model is the folder's."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=True).save_pretrained(tmp_path)
    assert cli.estimate([f"model.path={tmp_path}", "--gpus", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    layer = 4 * 96 * 96 + 3 * 96 * 160 + 2 * 96
    assert rows[0]["params"] == 512 * 96 + 3 * layer + 96  # tied lm_head counted once
    assert rows[0]["per_gpu_bytes"]["params"] == 4 * rows[0]["params"]


def test_eval_forward_formula():
    shape = synthetic(vocab=1000, hidden=64, kv_hidden=32, intermediate=128, layers=3)
    b, s = 8, 10
    logits = b * s * 1000 * (2 + 4 + 4)  # bf16 logits, their fp32 copy, the fp32 log-softmax
    assert eval_activation_bytes(shape, micro_batch=b, seq_len=s, precision=Precision.bf16) == logits + b * s * 64 * 2
    small_vocab = dataclasses.replace(shape, vocab=4)  # then one layer's intermediates are the larger
    layer = b * s * (6 * 64 + 2 * 32 + 4 * 128) * 4
    assert eval_activation_bytes(small_vocab, micro_batch=b, seq_len=s, precision=Precision.fp32) == \
        layer + b * s * 64 * 4
    assert eval_activation_bytes(shape, micro_batch=0, seq_len=s, precision=Precision.fp32) == 0


def test_eval_batch_is_the_peak_at_128k_vocab(capsys):
    """Llama 3 8B, 2048 tokens, bf16, training micro batch 1: eval's forward at its default micro batch
    of 8 needs more than training's saved activations, and the estimate's total follows eval.micro_batch_size."""
    job = ["model=llama3_8b", "data.max_length=2048", "train.micro_batch_size=1", "train.precision=bf16",
           "loss.chunk_size=0", "--gpus", "8", "--json"]  # the full logits (the default chunks them)

    def fsdp_row(*extra: str) -> dict:
        assert cli.estimate([*job, *extra]) == 0
        return next(r for r in json.loads(capsys.readouterr().out) if r["parallelism"] == "fsdp")

    row = fsdp_row()
    assert row["eval_micro_batch_size"] == 8
    assert row["eval_activations"] > 8 * 2048 * 128256 * 10 > row["train_activations"]
    assert row["per_gpu_bytes"]["activations"] == row["eval_activations"]
    one = fsdp_row("eval.micro_batch_size=1")
    assert one["per_gpu_bytes"]["activations"] == one["train_activations"] > one["eval_activations"]
    assert row["per_gpu_bytes"]["total"] - one["per_gpu_bytes"]["total"] == \
        row["eval_activations"] - one["train_activations"] > 6 * 2**30
    assert fsdp_row("data.eval_fraction=0")["eval_activations"] == 0  # no eval set: no eval forward
    assert cli.estimate(job[:-1] + ["eval.micro_batch_size=8"]) == 0  # the table shows both peaks
    out = capsys.readouterr().out
    assert "eval micro batch 8" in out and " train " in out and " eval " in out


def test_the_reference_and_theta0_are_named_lines_of_the_total(capsys):
    """loss.kd's reference (its bytes / N in loss.kd.reference_dtype) and loss.l2sp's theta0 (the rank's fp32
    ranges) are in the total and named in the table and the plan; their per-rank bytes are measured against
    real ranks in tests/e2e/test_frozen_model.py."""
    from fft_dist import planner

    base = ["model=llama3_8b", "data.max_length=2048", "train.precision=bf16"]
    cfg = typed(*base, "loss.kd.weight=0.5", "loss.kd.reference_dtype=bf16", "loss.l2sp.weight=0.1")
    shape = model_shape(cfg)
    plain = estimate(shape, typed(*base), Setup("fsdp", 8, 1, 2048, True))["per_gpu_bytes"]
    both = estimate(shape, cfg, Setup("fsdp", 8, 1, 2048, True))["per_gpu_bytes"]
    assert both["kd_reference"] == 2 * (shape.params // 8) and both["l2sp_theta0"] == 4 * (shape.params // 8)
    assert both["total"] - plain["total"] == both["kd_reference"] + both["l2sp_theta0"]
    offload = estimate(shape, cfg, Setup("zero3_offload", 8, 1, 2048, True))
    assert "l2sp_theta0" not in offload["per_gpu_bytes"]  # theta0 sits beside the fp32 partition, in CPU memory
    assert cli.estimate([*base, "loss.kd.weight=0.5", "loss.l2sp.weight=0.1", "--gpus", "8"]) == 0
    assert "of the total: kd reference" in capsys.readouterr().out
    choice = planner.best_plan(cfg, shape, gpus=8, gpu_mem=80 * 2**30)
    assert any(r.startswith("the total includes kd reference") for r in choice.reasons)
