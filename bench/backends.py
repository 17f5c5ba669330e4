"""Backends side by side: the same tiny job under none, fsdp, zero2 and zero3, through the real entry point.

    python bench/backends.py [--steps 20] [--repeat 3] [--backends none fsdp zero2 zero3] [--no-record]

Every backend runs `python -m torch.distributed.run --nproc_per_node 2 -m fft_dist.train parallelism=X ...`
(`none`: one process, the same global batch) with OMP_NUM_THREADS=1 per rank on gloo. Each rank
is started through this file's `--rank-worker` mode, which runs fft_dist.train unchanged and writes
its peak RSS (ru_maxrss) at exit. From each run's metrics.jsonl it reports the median tokens/s and
s/step over the steps after the first two (warm-up), the final loss, and the peak RSS of every rank.
With --repeat N the backends run N interleaved rounds and the table keeps each backend's fastest
round (and shows the range): on a small shared machine, step times vary by tens of percent.
It prints one table and appends it, with the command, machine and date, to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine, record, versions

REPO = Path(__file__).resolve().parents[1]
RSS_DIR_ENV = "FFT_DIST_BENCH_RSS_DIR"

JOB = [
    # tiny_llama (1.31M params) on the bundled docstring corpus; rows of unequal length up to 128 tokens
    "model=tiny_llama", "data.max_length=128", "data.eval_fraction=0", "eval.every_steps=0",
    "train.global_batch_size=16", "train.micro_batch_size=4", "train.lr=1e-3", "train.warmup_steps=2",
    "checkpoint.save_final=false",
]


def rank_worker(argv: list[str]) -> None:
    """One rank: run fft_dist.train as is, then record this process's peak RSS."""
    out = Path(os.environ[RSS_DIR_ENV])

    def record_rss() -> None:
        rank = os.environ.get("RANK", "0")
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (out / f"rss-rank{rank}.json").write_text(json.dumps({"rank": int(rank), "peak_rss_mb": kib / 1024}))

    from fft_dist.dist import exit_rank
    from fft_dist.preemption import StopSignal
    from fft_dist.rank import run_worker

    code = run_worker(argv, stop=StopSignal())
    record_rss()  # before exit_rank, which skips interpreter finalisation (and atexit)
    exit_rank(code)


def run_backend(backend: str, steps: int, work: Path) -> dict:
    run_dir = work / backend
    rss_dir = work / f"{backend}-rss"
    rss_dir.mkdir(parents=True, exist_ok=True)
    nproc = 1 if backend == "none" else 2
    overrides = [f"parallelism={backend}", *JOB, f"train.max_steps={steps}", f"run.dir={run_dir}"]
    me = [str(Path(__file__).resolve()), "--rank-worker", *overrides]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *me]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env[RSS_DIR_ENV] = str(rss_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("FFT_DIST_CONFIG", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    timed = rows[2:] or rows
    rss = sorted((json.loads(p.read_text()) for p in rss_dir.glob("rss-rank*.json")), key=lambda r: r["rank"])
    return {"backend": backend, "ranks": nproc, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "s_per_step": _s_per_step(rows), "final_loss": rows[-1]["loss"],
            "peak_rss_mb": [r["peak_rss_mb"] for r in rss], "wall_s": wall}


def _s_per_step(rows: list[dict]) -> float:
    """Median step time from consecutive tokens_seen deltas and tokens_per_s (both logged every step)."""
    times = []
    prev = None
    for r in rows:
        if prev is not None and r["step"] == prev["step"] + 1:
            times.append((r["tokens_seen"] - prev["tokens_seen"]) / r["tokens_per_s"])
        prev = r
    return statistics.median(times[1:] or times)  # steps 3.. (the first delta is step 2)


def table(results: list[dict]) -> str:
    lines = ["| backend | ranks | tokens/s | tokens/s, all rounds | s/step | final loss | peak RSS per rank (MB) | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rss = " / ".join(f"{x:.0f}" for x in r["peak_rss_mb"])
        lo, hi = r["tokens_per_s_range"]
        lines.append(f"| {r['backend']} | {r['ranks']} | {r['tokens_per_s']:.0f} | {lo:.0f}-{hi:.0f} | "
                     f"{r['s_per_step']:.3f} | {r['final_loss']:.4f} | {rss} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        rank_worker(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backends", nargs="+", default=["none", "fsdp", "zero2", "zero3"],
                    choices=["none", "fsdp", "zero2", "zero3", "zero2_offload", "zero3_offload"])
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all backends (interleaved); the table keeps each backend's fastest round")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fft-dist-bench-backends-"))
    rounds: dict[str, list[dict]] = {b: [] for b in args.backends}
    try:
        for i in range(args.repeat):
            for backend in args.backends:
                print(f"round {i + 1}/{args.repeat}: {backend} ...", flush=True)
                rounds[backend].append(run_backend(backend, args.steps, work / f"r{i}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = []
    for backend, runs in rounds.items():
        best = dict(max(runs, key=lambda r: r["tokens_per_s"]))
        best["tokens_per_s_range"] = (min(r["tokens_per_s"] for r in runs), max(r["tokens_per_s"] for r in runs))
        results.append(best)
    command = "python bench/backends.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"## Backends: tokens/s and peak RSS ({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine()}",
        f"- versions: {versions('torch', 'deepspeed', 'transformers')}",
        f"- job: `{' '.join(JOB)} train.max_steps={args.steps}`; 2 ranks (none: 1 process, same global batch), "
        "OMP_NUM_THREADS=1 per rank, gloo, fp32; medians over the steps after the first two, "
        f"fastest of {args.repeat} interleaved round(s). "
        "Peak RSS is ru_maxrss of each rank (imports of torch + transformers alone are ~330 MB; "
        "DeepSpeed adds its own).",
        "",
        table(results),
        "",
    ])
    record(text, no_record=args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
