"""Distillation from the starting model (loss.kd) and the pull toward the starting weights (loss.l2sp), issue 20,
in real runs through the CLI (2 gloo ranks, fp32, the tiny Llama, loss.chunk_size=16; one run per backend):
- with both on, none, fsdp x2, zero2 x2 and zero3 x2 agree within 1e-5 (loss, l2sp_loss relative; kd_loss
  relative to the loss: see assert_parity);
- a resume with both on is bit-identical to the uninterrupted run under fsdp and (slow) zero3;
- a large loss.l2sp.weight keeps theta closer to theta0 than 0 does (direction);
- the options refuse bad values (exit 2 naming the option); the reference comes from model.path or loss.kd.reference.
In process (the KL itself): tests/unit/test_kd_l2sp.py.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from family_checks import same_state
from helpers import TINY_JOB, fft_dist, step_records, train


# -- real runs: 2 gloo ranks, fp32, the tiny Llama ---------------------------------------------------------------
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
KD_JOB = (*TINY_JOB, "train.max_steps=4", "train.warmup_steps=1", "loss.chunk_size=16", "loss.kd.weight=0.5",
          "loss.kd.temperature=2", "loss.l2sp.weight=0.1")
PARTS = ("loss", "kd_loss", "l2sp_loss")


def parts(run: Path) -> dict[int, tuple[float, ...]]:
    return {r["step"]: tuple(r[k] for k in PARTS) for r in step_records(run)}


def assert_parity(got: dict, want: dict, what: str) -> None:
    """loss and l2sp_loss within 1e-5 relative; kd_loss within 1e-5 of the loss: it is a KL between nearly equal
    distributions (0 at step 1), so its own relative round-off is that of the logits over their small change."""
    assert sorted(got) == sorted(want) == [1, 2, 3, 4], what
    for step in want:
        (loss, kd, l2sp), (loss0, kd0, l2sp0) = got[step], want[step]
        assert abs(loss - loss0) <= 1e-5 * abs(loss0), (what, step, loss, loss0)
        assert abs(l2sp - l2sp0) <= 1e-5 * abs(l2sp0), (what, step, l2sp, l2sp0)
        assert abs(kd - kd0) <= 1e-5 * abs(loss0), (what, step, kd, kd0)
    assert want[1][1] == 0.0 and want[4][1] > 0 and want[4][2] > want[1][2] > 0  # the terms are live


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("kd") / "fsdp"
    train(run, *KD_JOB, "checkpoint.every_steps=2", "checkpoint.save_final=true", parallelism="fsdp")
    return run


def test_kd_and_l2sp_agree_between_none_and_fsdp(fsdp_run, tmp_path):
    train(tmp_path / "none", *KD_JOB, nproc=1, parallelism="none")
    assert_parity(parts(fsdp_run), parts(tmp_path / "none"), "fsdp x2 vs none")


def test_resume_with_kd_and_l2sp_is_bit_identical_under_fsdp(fsdp_run, tmp_path):
    """The reference and theta0 are rebuilt from the start (not checkpointed): steps 3-4 and the final weights and
    optimizer states of a run resumed at step 2 are the uninterrupted run's, bit for bit."""
    resume_at_step_2(fsdp_run, tmp_path / "run", "fsdp")


def resume_at_step_2(full: Path, run: Path, parallelism: str) -> None:
    """Resume `full`'s step-2 checkpoint in a fresh run dir to step 4: bit-identical to `full` (the parts of steps
    3-4 and every tensor of the final checkpoint)."""
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000002")
    train(run, *KD_JOB, "checkpoint.save_final=true", "resume=auto", parallelism=parallelism)
    want, got = parts(full), parts(run)
    assert sorted(got) == [3, 4] and [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)], parallelism
    assert same_state(full / "checkpoints" / "step-0000004", run / "checkpoints" / "step-0000004") is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed")
def test_kd_and_l2sp_under_zero2_and_zero3(fsdp_run, tmp_path):
    """The reference is a ZeRO-3 inference engine under both; the pull goes into the fp32 master partition. zero2
    (with a frozen layer: ZeRO-2 keeps it whole on every rank, outside its partitions) agrees with none, zero3
    with fsdp x2; a zero3 resume is bit-identical."""
    train(tmp_path / "zero2", *KD_JOB, "model.freeze_layers=1", parallelism="zero2")
    train(tmp_path / "none", *KD_JOB, "model.freeze_layers=1", nproc=1, parallelism="none")
    assert_parity(parts(tmp_path / "zero2"), parts(tmp_path / "none"), "zero2 x2 vs none, a layer frozen")
    train(tmp_path / "zero3", *KD_JOB, "checkpoint.every_steps=2", "checkpoint.save_final=true", parallelism="zero3")
    assert_parity(parts(tmp_path / "zero3"), parts(fsdp_run), "zero3 x2 vs fsdp x2")
    resume_at_step_2(tmp_path / "zero3", tmp_path / "zero3_resumed", "zero3")


def test_a_large_l2sp_weight_keeps_the_weights_near_the_start(tmp_path):
    """||theta - theta0||^2 = l2sp_loss / lambda: with lambda x lr = 0.3 per step it ends well below lambda ~ 0's
    (1e-6: a pull of 3e-9 per step, which logs the distance without changing the run measurably)."""
    job = (*TINY_JOB, "train.max_steps=4", "train.warmup_steps=1")
    distance = {}
    for weight in (1e-6, 100.0):
        train(tmp_path / str(weight), *job, f"loss.l2sp.weight={weight}", nproc=1, parallelism="none")
        distance[weight] = step_records(tmp_path / str(weight))[-1]["l2sp_loss"] / weight
    print(f"||theta - theta0||^2 after 4 steps: {distance}")
    assert distance[100.0] < 0.5 * distance[1e-6]


def test_bad_values_are_refused_naming_the_option(tmp_path):
    from fft_dist.config.loss import KDConfig, L2SPConfig
    from fft_dist.errors import ConfigError

    for make, option in ((lambda: KDConfig(weight=-1.0), "loss.kd.weight"),
                         (lambda: KDConfig(temperature=0.0), "loss.kd.temperature"),
                         (lambda: L2SPConfig(weight=float("inf")), "loss.l2sp.weight")):
        with pytest.raises(ConfigError, match=option):
            make()
    run = f"run.dir={tmp_path / 'run'}"
    for override, option in (("loss.kd.temperature=-2", "loss.kd.temperature"),  # typed: stops at compose
                             (f"loss.kd.reference={tmp_path}", "loss.kd.reference")):  # a folder without config.json
        proc = fft_dist("train", *TINY_JOB, run, "loss.kd.weight=0.5", override, "launcher.dry_run=true")
        assert proc.returncode == 2 and option in proc.stderr + proc.stdout, (override, proc.stdout, proc.stderr)
    help_text = fft_dist("train", "--help").stdout
    assert "loss.kd.temperature" in help_text and "loss.l2sp.weight" in help_text


def _save_tiny(folder: Path, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_the_reference_comes_from_model_path_or_loss_kd_reference(tmp_path):
    """Under model.path the reference is that folder, loaded into the frozen FSDP2 model (built on meta): kd_loss
    is 0 at step 1. loss.kd.reference names another folder: kd_loss is not 0 there."""
    start, other = _save_tiny(tmp_path / "start", 1), _save_tiny(tmp_path / "other", 2)
    job = [a for a in KD_JOB if not a.startswith("model.")] + ["train.max_steps=2", f"model.path={start}",
                                                                 "model.tokenizer=bundled"]
    train(tmp_path / "own", *job, parallelism="fsdp")
    own = parts(tmp_path / "own")
    assert own[1][1] == 0.0 and own[2][1] > 0
    train(tmp_path / "named", *job, f"loss.kd.reference={other}", nproc=1, parallelism="none")
    named = parts(tmp_path / "named")
    assert named[1][0] == pytest.approx(own[1][0], rel=1e-6) and named[1][1] > 0.01
