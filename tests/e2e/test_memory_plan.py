"""`fft-dist plan` (issue 11): the cheapest set-up that fits, keeping the global batch (the console script
in a child process: no ranks)."""
from __future__ import annotations

from helpers import fft_dist
from fft_dist.compose import prepare


def test_cli_plan_prints_overrides_that_run():
    """The real entry point; the pasted overrides compose and validate (the launcher's own checks) at the
    planned world size. At 25 GiB only activation checkpointing lets `none` fit (since the loss is chunked by
    default, micro batch 1 without it fits at 28 GiB; at 24 GiB nothing but an offload row fits)."""
    proc = fft_dist("plan", "--gpus", "1", "--gpu-mem", "25GiB", "model=llama3_1b", "data.max_length=2048")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("plan: none on 1 GPU(s)"), out
    assert "activation checkpointing cuts activations" in out
    overrides = out.strip().splitlines()[-1].split()
    assert "model.activation_checkpointing=true" in overrides and "launcher.nproc_per_node=1" in overrides
    prepared = prepare(["model=llama3_1b", "data.max_length=2048", *overrides], world_size=None)
    assert prepared.plan.world_size == 1 and prepared.plan.global_batch_size == 16
    assert prepared.plan.micro_batch_size * prepared.plan.grad_accum == 16
