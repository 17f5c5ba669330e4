"""The first check on a GPU machine: does fft-dist train on these GPUs, how fast, how much memory
against `fft-dist estimate`, and how often does a step make the host wait for the GPU?

    bench/gpu_smoke.sh [--budget-s 290] [--steps 20] [--no-record]

It adapts to the GPUs torch sees:
- one GPU: `parallelism=fsdp` and `parallelism=zero3`, one rank each, then `bench/gpu.py --no-hf`
  (the ~1.1B TinyLlama shape, its MFU);
- two or more: the same two backends on 2 ranks over NCCL, then `bench/gpu.py --no-hf` on one GPU.
Every job is bf16 from random init (no model download, no network: HF_*_OFFLINE=1) with the
defaults users get (train.deterministic=auto -> false on a GPU, dist.backend=auto -> nccl). The
fsdp/zero3 model has Llama 3's 128k vocabulary, so eval's logits (eval.micro_batch_size 8) are part of the memory peak.
DeepSpeed gets fft-dist's client torch optimizer and no offload, so no DeepSpeed op is built; the
script checks that (TORCH_EXTENSIONS_DIR starts empty and must stay so). Syncs are counted in each
rank with torch.cuda.set_sync_debug_mode("warn") (bench/smoke_hook). Every job has a deadline, so the
whole run stays within --budget-s (default 290 s) and can be rerun.

Prints one table (and appends it to bench/RESULTS.md unless --no-record). Exit codes:
0 every job passed; 1 a job failed or ran out of time (its row says which, its log is kept);
2 a bad option; 77 no CUDA GPU is visible: nothing was run (77 is the "skipped" code of automake
and meson, so a CI step can tell "no GPU here" from a failure).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from machine_info import machine, record, versions  # noqa: E402

NO_GPU = 77
SMOKE_MODEL = ["model=tiny_llama", "model.name=smoke_128k", "model.arch.vocab_size=128256",
               "model.arch.hidden_size=1024", "model.arch.intermediate_size=3584", "model.arch.num_hidden_layers=8",
               "model.arch.num_attention_heads=16", "model.arch.num_key_value_heads=4",
               "model.arch.max_position_embeddings=2048"]
"""~0.37B parameters, 0.26B of them the 128k-row embeddings and head: Llama 3's vocabulary on a
model small enough to start in seconds."""


def gpus_visible() -> tuple[int, str]:
    """(CUDA GPUs torch sees, a line saying what torch is)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n, f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'no'}"


def job_env(sync_log: Path, ext_dir: Path) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", SMOKE_SYNC_LOG=str(sync_log),
               TORCH_EXTENSIONS_DIR=str(ext_dir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE / "smoke_hook"), str(REPO), env.get("PYTHONPATH", "")) if p)
    for k in ("FFT_DIST_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_job(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[str, str]:
    """(status, output) of one job, run in its own process group: at its deadline the whole group is
    killed (a one-rank job runs in the launcher's process and would outlive a killed parent)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "out of time", out or ""
    return ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), out


def train_overrides(backend: str, ranks: int, steps: int, work: Path) -> list[str]:
    return [f"parallelism={backend}", f"launcher.nproc_per_node={ranks}", *SMOKE_MODEL, "train.precision=bf16",
            "data.max_length=1024", "data.packing=true", f"data.cache_dir={work / 'data_cache'}",
            f"train.max_steps={steps}", "train.micro_batch_size=4", f"train.global_batch_size={4 * ranks}",
            "train.lr=3e-4", "train.warmup_steps=2", f"eval.every_steps={max(1, steps // 2)}", "eval.max_batches=2",
            "checkpoint.save_final=false", f"run.dir={work / f'{backend}_x{ranks}'}"]


def estimate_gib(overrides: list[str], backend: str, ranks: int, env: dict, timeout: float) -> float | None:
    """`fft-dist estimate`'s per-GPU total for the job (GiB), to set against the measured peak."""
    keep = [o for o in overrides if not o.startswith(("parallelism=", "launcher.", "run.dir="))]
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", "estimate", *keep, "--gpus", str(ranks), "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        return None
    row = next((r for r in json.loads(proc.stdout) if r["parallelism"] == backend), None)
    return row["per_gpu_bytes"]["total"] / 2**30 if row else None


def sync_counts(log: Path) -> dict:
    """Rank 0's syncs per step (median after the first, max), and the steps seen, from the hook's log."""
    rows = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    mine = [int(r[2]) for r in rows if r[0] == "0"]
    later = mine[1:] or mine
    return {"sync_median": statistics.median(later) if later else None, "sync_max": max(later, default=None),
            "sync_first": mine[0] if mine else None, "steps_seen": len(mine)}


def run_train_job(backend: str, ranks: int, args, work: Path, deadline: float) -> dict:
    name = f"{backend} x{ranks}"
    log, ext = work / f"{backend}_x{ranks}.syncs", work / f"{backend}_x{ranks}.torch_extensions"
    ext.mkdir()
    env = job_env(log, ext)
    overrides = train_overrides(backend, ranks, args.steps, work)
    row: dict = {"job": name, "ranks": ranks}
    t0 = time.monotonic()
    status, output = run_job([sys.executable, "-m", "fft_dist.cli", "train", *overrides], env,
                             deadline - time.monotonic())
    row["wall_s"] = time.monotonic() - t0
    (work / f"{backend}_x{ranks}.log").write_text(output)
    metrics = work / f"{backend}_x{ranks}" / "metrics.jsonl"
    steps = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x] if metrics.exists() else []
    later = steps[2:] or steps
    row.update(status=status, steps=len(steps),
               tokens_per_s=statistics.median(r["tokens_per_s"] for r in later) if later else None,
               mfu=statistics.median(r["mfu"] for r in later) if later and later[0]["mfu"] is not None else None,
               peak_gib=max(r["peak_mem_mb"] for r in steps) / 1024 if steps else None,
               built=sorted(p.name for p in ext.iterdir()), **sync_counts(log))
    if row["built"] and status == "ok":
        row["status"] = f"built DeepSpeed ops {row['built']}"
    remaining = deadline - time.monotonic()
    row["estimate_gib"] = estimate_gib(overrides, backend, ranks, env, remaining) if remaining > 5 else None
    return row


def run_gpu_bench(args, work: Path, deadline: float) -> dict:
    """bench/gpu.py on one GPU, the ~1.1B model, fft-dist only (HF Trainer needs `accelerate`)."""
    log, out, ext = work / "gpu_bench.syncs", work / "gpu_bench.json", work / "gpu_bench.torch_extensions"
    ext.mkdir()
    env = job_env(log, ext)
    cmd = [sys.executable, str(HERE / "gpu.py"), "--model", "1b", "--steps", str(max(args.steps // 2, 6)),
           "--micro", "4", "--seq", "2048", "--no-hf", "--no-record", "--json", str(out)]
    row: dict = {"job": "bench/gpu.py 1.1B fsdp x1", "ranks": 1, "estimate_gib": None}
    t0 = time.monotonic()
    status, output = run_job(cmd, env, deadline - time.monotonic())
    row["wall_s"] = time.monotonic() - t0
    (work / "gpu_bench.log").write_text(output)
    bench = json.loads(out.read_text())[0] if out.exists() else {}
    row.update(status=status, steps=bench.get("steps", 0), tokens_per_s=bench.get("tokens_per_s"),
               mfu=bench.get("mfu"), peak_gib=bench.get("peak_mem_gib"), built=sorted(p.name for p in ext.iterdir()),
               **sync_counts(log))
    return row


def table(rows: list[dict]) -> str:
    def num(v, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = ["| job | ranks | status | steps | tokens/s | MFU | peak GiB (rank 0) | estimate GiB | syncs/step "
             "(median, max) | syncs, first step | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['job']} | {r['ranks']} | {r['status']} | {r['steps']} | {num(r['tokens_per_s'], '.0f')} | "
                     f"{mfu} | {num(r['peak_gib'], '.2f')} | {num(r['estimate_gib'], '.2f')} | "
                     f"{num(r['sync_median'], 'g')}, {num(r['sync_max'], 'g')} | {num(r['sync_first'], 'g')} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=290.0, help="wall-clock limit of the whole run (default 290)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per fft-dist job (default 20)")
    ap.add_argument("--no-record", action="store_true", help="print the table only (no bench/RESULTS.md entry)")
    args = ap.parse_args(argv)
    if args.budget_s <= 0 or args.steps < 3:
        ap.error("--budget-s must be positive and --steps at least 3 (the first two are warm-up)")
    start = time.monotonic()
    n, torch_line = gpus_visible()
    if n == 0:
        print(f"gpu_smoke: no CUDA GPU is visible ({torch_line}); nothing was run. Exit {NO_GPU} means "
              "'skipped: no GPU' (bench/gpu_smoke.py).", file=sys.stderr)
        return NO_GPU
    import torch

    ranks = 2 if n >= 2 else 1
    work = Path(tempfile.mkdtemp(prefix="fft-dist-gpu-smoke-"))
    deadline = start + args.budget_s
    # each training job gets a third of what is left when it starts; gpu.py gets the rest
    rows = []
    for i, backend in enumerate(("fsdp", "zero3")):
        share = (deadline - time.monotonic()) / (3 - i)
        rows.append(run_train_job(backend, ranks, args, work, time.monotonic() + share))
        print(f"gpu_smoke: {rows[-1]['job']}: {rows[-1]['status']} ({rows[-1]['wall_s']:.0f} s)", flush=True)
    rows.append(run_gpu_bench(args, work, deadline))
    print(f"gpu_smoke: {rows[-1]['job']}: {rows[-1]['status']} ({rows[-1]['wall_s']:.0f} s)", flush=True)
    devices = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(n)}))
    text = "\n".join([
        f"## GPU smoke: fsdp and zero3 over NCCL, bench/gpu.py ({time.strftime('%Y-%m-%d %H:%M %Z')})", "",
        f"- command: `bench/gpu_smoke.sh {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}; {n} GPU(s): {devices}; {ranks} rank(s) per job",
        f"- versions: {versions('torch', 'transformers', 'deepspeed')}; {torch_line}",
        f"- jobs: `{' '.join(train_overrides('<backend>', ranks, args.steps, Path('<work>')))}` (tokens/s and MFU: "
        "median after 2 steps; peak: torch.cuda.max_memory_allocated on rank 0; estimate: `fft-dist estimate` for the "
        "same overrides); bench/gpu.py: `--model 1b --micro 4 --seq 2048 --no-hf`. Syncs: rank 0, "
        f"set_sync_debug_mode('warn'), steps after the first. Logs: {work}",
        "",
        table(rows),
        "",
    ])
    record(text, no_record=args.no_record)
    failed = [r["job"] for r in rows if r["status"] != "ok"]
    print(f"gpu_smoke: {len(rows) - len(failed)} of {len(rows)} jobs passed in {time.monotonic() - start:.0f} s"
          + (f"; failed: {', '.join(failed)} (logs in {work})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
