"""Helpers and fixtures moved unchanged from tests/test_checkpoint_e2e.py when the tests were split into unit/ and
e2e/ (issue 18), so that no test file imports another and nothing is copied. Used by
e2e/test_checkpoint_runs.py, e2e/test_hsdp.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import REPO, child_env, descendants, read_metrics


ODD_TIED_JOB = [
    "model.name=odd_tied",
    "model.arch.vocab_size=2051",
    "model.arch.hidden_size=50",
    "model.arch.intermediate_size=101",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=1",
    "model.arch.num_key_value_heads=1",
    "model.arch.tie_word_embeddings=true",
    "data.max_length=64",
    "data.max_examples=256",
    "train.max_steps=8",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "eval.every_steps=2",
    "eval.max_batches=2",
    "eval.patience=50",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=3",
]


def torchrun_train(run_dir: Path, *overrides: str, nproc: int = 2, parallelism: str = "fsdp",
                   expect_rc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "--monitor_interval", "0.2", "-m", "fft_dist.train", f"run.dir={run_dir}",
           f"parallelism={parallelism}", *ODD_TIED_JOB, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect_rc:
        raise AssertionError(f"training exited {proc.returncode} (expected {expect_rc})\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def losses_by_step(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """The last record per step (resume=auto appends to the same metrics.jsonl)."""
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def stop_train_ranks(proc: subprocess.Popen) -> str:
    """SIGTERM both `fft_dist.train` ranks under torchrun `proc`; return its output once it has exited 75."""
    from fft_dist.exit_codes import PREEMPTED

    workers = [p for p in descendants(proc.pid)
               if "fft_dist.train" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert f"exitcode  : {PREEMPTED}" in out, out[-4000:]
    return out
