"""The chunked loss (loss.chunk_size, issue 20) in real processes.

- Backends: fsdp, zero2, zero3 and hsdp (two 1-rank replicas) on 2 gloo ranks (tests/support/chunked_worker.py,
  one process group) give the chunk_size=0 losses and eval loss within 1e-6 relative through the trainer's own
  loss path, and the same gradient norms within 1e-6 relative: the parity that makes chunking the default (loss.chunk_size=-1, auto) on every backend.
- A run with chunking logs the same step and eval losses as one without (parallelism=none, fp32).
In-process parity, refusals, memory and the estimate: tests/unit/test_chunked_loss.py.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import REPO, SUPPORT, TINY_JOB, child_env, eval_losses, train, train_losses

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
WORKER = SUPPORT / "chunked_worker.py"


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed not installed (zero2, zero3)")
def test_every_distributed_backend_gives_the_unchunked_losses(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(tmp_path), "--backends", "fsdp", "zero2", "zero3", "hsdp"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = json.loads((tmp_path / "chunked.json").read_text())
    assert {key.split("/")[0] for key in ranks[0]} == {"fsdp", "zero2", "zero3", "hsdp"}
    for rank, rows in enumerate(ranks):
        for key, full in rows.items():
            if not key.endswith("/0"):
                continue
            chunked = rows[key[:-1] + "5"]
            print(f"rank {rank} {key[:-2]}: losses {full['losses']} vs chunked {chunked['losses']}, "
                  f"eval {full['eval_sum']} vs {chunked['eval_sum']}")
            for a, c in zip(full["losses"] + [full["eval_sum"]], chunked["losses"] + [chunked["eval_sum"]]):
                assert abs(a - c) <= 1e-6 * abs(a), (rank, key, full, chunked)
            for a, c in zip(full["grad_norms"], chunked["grad_norms"]):  # | |g'| - |g| | <= |g' - g|: a bound's check
                assert abs(a - c) <= 1e-6 * abs(a), (rank, key, full, chunked)
            assert chunked["logits_none"] and not full["logits_none"]
            assert full["losses"][-1] != full["losses"][0], "training moved nothing: the comparison proves little"


@pytest.mark.slow  # two real runs
def test_a_run_with_chunking_logs_the_same_losses(tmp_path):
    """The trainer's and evaluation's call sites end to end (parallelism=none, fp32): steps and evals as without."""
    job = [*TINY_JOB, "eval.every_steps=5"]
    train(tmp_path / "full", *job, "loss.chunk_size=0", nproc=1, parallelism="none")
    train(tmp_path / "chunked", *job, "loss.chunk_size=16", nproc=1, parallelism="none")
    for got, want in ((train_losses(tmp_path / "chunked"), train_losses(tmp_path / "full")),
                      ([v for _, v in eval_losses(tmp_path / "chunked")], [v for _, v in eval_losses(tmp_path / "full")])):
        assert len(got) == len(want) > 1
        assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(got, want)), (got, want)


def test_auto_chunking_falls_back_to_full_logits_where_the_head_rules_do_not_hold(tmp_path):
    """The trainer's check before training: a Llama whose config names a soft-cap that its forward never applies
    trains with loss.chunk_size=auto on the full logits (said once), where an explicit size would be refused."""
    proc = train(tmp_path / "run", *TINY_JOB, "train.max_steps=2", "+model.arch.final_logit_softcapping=30.0",
                 nproc=1, parallelism="none")
    assert "loss.chunk_size=auto: the llama model's logits are not what fft-dist's head rules make" in proc.stdout
    assert len(train_losses(tmp_path / "run")) == 2
