"""train.compile=true: every decoder layer's forward goes through torch.compile where it works
(none, fsdp, zero2), and is refused before launch where it does not (zero3).

The parity test runs real 2-rank jobs (gloo) on the tiny model; inductor's CPU compile takes tens
of seconds, hence slow.
"""
from __future__ import annotations

import importlib.util

import pytest

from helpers import TINY_JOB, fft_dist, read_metrics, train
from fft_dist.compose import compose, to_typed
from fft_dist.config import BatchPlan, ConfigError
from fft_dist.strategy import check


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")


PLAN = BatchPlan(world_size=2, micro_batch_size=2, grad_accum=1, global_batch_size=4)


STEPS = ["train.max_steps=3", "eval.max_batches=1"]


@needs_deepspeed
def test_zero3_refuses_compile_before_launch_and_says_why():
    with pytest.raises(ConfigError, match=r"train.compile=true does not work under parallelism=zero3.*eager"):
        check(to_typed(compose(["parallelism=zero3", "train.compile=true"])), PLAN)
    check(to_typed(compose(["parallelism=zero2", "train.compile=true"])), PLAN)  # allowed
    proc = fft_dist("train", "parallelism=zero3", "train.compile=true", "launcher.nproc_per_node=2", *TINY_JOB)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.compile=true does not work under parallelism=zero3" in proc.stderr + proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", pytest.param("zero2", marks=needs_deepspeed)])
def test_compiled_run_matches_the_uncompiled_losses(tmp_path, backend):
    eager = train(tmp_path / "eager", *TINY_JOB, *STEPS, parallelism=backend)
    compiled = train(tmp_path / "compiled", *TINY_JOB, *STEPS, "train.compile=true", parallelism=backend, timeout=600)
    assert "train.compile" not in eager.stderr
    assert "recompile_limit" not in compiled.stderr  # compiled for real, no fall-back to eager
    a, b = (losses(read_metrics(tmp_path / run)) for run in ("eager", "compiled"))
    assert len(a) == len(b) == 4  # 3 steps and the final eval
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)


def losses(records: list[dict]) -> list[float]:
    return [r.get("loss", r.get("eval_loss")) for r in records if "loss" in r or "eval_loss" in r]
