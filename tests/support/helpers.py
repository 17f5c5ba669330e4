"""Test helpers (import with `from helpers import ...`): run real fft-dist jobs (real processes, gloo)
on tiny models and read their output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent  # tests/support: these helpers, the workers, plugins, toy_conf, hooks
REPO = SUPPORT.parents[1]

# A ~100k-parameter Llama: hidden 64, 2 layers; uses the bundled 2048-token tokenizer.
TINY_MODEL = [
    "model.name=test_tiny",
    "model.arch.hidden_size=64",
    "model.arch.intermediate_size=128",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=4",
    "model.arch.num_key_value_heads=2",
]
# Small, fast, fully deterministic job: 64-token rows of unequal length, no warmup surprises.
TINY_TRAIN = [
    "data.max_length=64",
    "data.max_examples=256",
    "train.max_steps=10",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "eval.every_steps=0",
    "eval.max_batches=2",
    "checkpoint.save_final=false",
]
TINY_JOB = TINY_MODEL + TINY_TRAIN


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FFT_DIST_CONFIG", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    # workers started by path (tests/*_worker.py) import this checkout's fft_dist
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def fft_dist(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point (`fft-dist ...`) in a subprocess."""
    return subprocess.run([sys.executable, "-m", "fft_dist.cli", *args], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


def train(run_dir: Path, *overrides: str, nproc: int = 2, parallelism: str = "fsdp",
          expect_rc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = fft_dist("train", f"run.dir={run_dir}", f"parallelism={parallelism}",
                    f"launcher.nproc_per_node={nproc}", *overrides, timeout=timeout)
    if proc.returncode != expect_rc:
        raise AssertionError(f"fft-dist train exited {proc.returncode} (expected {expect_rc})\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_records(run_dir: Path) -> list[dict]:
    """The per-step records (those with a loss) of metrics.jsonl."""
    return [r for r in read_metrics(run_dir) if "loss" in r]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in read_metrics(run_dir) if "eval_loss" in r]


def assert_close_rel(a: list[float], b: list[float], rel: float, what: str) -> None:
    assert len(a) == len(b) and a, f"{what}: lengths differ ({len(a)} vs {len(b)})"
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    assert worst <= rel, f"{what}: max relative error {worst:.3e} > {rel:.0e}\n{a}\n{b}"


def children(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (the ranks or agents a launcher started)."""
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:  # the process (or a thread) is gone
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, depth first (a launcher's agents, runners and ranks)."""
    return [d for c in children(pid) for d in (c, *descendants(c))]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has finished; it only waits for its parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def catches_signal(pid: int, sig: int) -> bool:
    """True once `pid` has a handler for `sig` (/proc/PID/status SigCgt): the process is ready for it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False
