"""Peak RSS per rank of real `fft-dist train` runs against `fft_dist.memory`'s estimate, at 1, 2 and 4 ranks.

    python bench/memory.py [--model tiny|50m] [--worlds 1 2 4] [--backends none fsdp zero2 zero3]
                           [--steps 4] [--json rows.json] [--no-record]

Each run is the real entry point (torch.distributed.run + fft_dist.train, gloo, fp32, AdamW) started
through bench/backends.py's rank worker, which writes every rank's ru_maxrss at exit.

The allowance for the framework's baseline on CPU: a CPU process holds far more than model states
(the interpreter, torch, transformers, the tokenizer, the encoded data set, DeepSpeed's modules,
allocator slack: ~330 MB for the imports alone, CPU-FACTS.md; ~480 MB per rank all told). It is
measured here, not assumed: the same job, backend and rank count with a ~37k-parameter model
("mini"); its peak RSS less that model's own estimate is the baseline. The prediction for a rank:
    baseline(backend, ranks) + estimate(backend, ranks)["per_gpu_bytes"]["total"]
(model states + activations + buffers), with DeepSpeed's buckets at the CPU values the run used.
glibc keeps freed memory in its heap, so what setup and the steps free (ZeRO-3's setup, FSDP's
gathered parameters and unsharded gradients, activations) stays in the peak. Set MALLOC_MMAP_THRESHOLD_=65536
MALLOC_TRIM_THRESHOLD_=0 to measure live memory only; the ranks inherit this environment.
The estimate's model-state bytes are shown next to it; tests/e2e/test_memory_measured.py checks those
against counted tensor bytes (within 10%).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine, record, versions

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
MB = 2**20
MODELS = {
    "tiny": ["model=tiny_llama"],
    # ~48M parameters: hidden 640, 10 layers, MLP 1728, vocab 2048
    "50m": ["model=tiny_llama", "model.name=llama_50m", "model.arch.hidden_size=640",
            "model.arch.intermediate_size=1728", "model.arch.num_hidden_layers=10",
            "model.arch.num_attention_heads=10", "model.arch.num_key_value_heads=5"],
    # the baseline: the same job with a model of negligible size (~37k parameters, ~0.6 MB of states)
    "mini": ["model=tiny_llama", "model.name=mini", "model.arch.hidden_size=8", "model.arch.intermediate_size=16",
             "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=1"],
}
# fp32 named, not left to `auto`: the ranks decide fp32 on CPU, but the estimate plans a GPU's bf16
JOB = ["train.precision=fp32", "data.max_length=128", "data.eval_fraction=0", "eval.every_steps=0", "train.micro_batch_size=4",
       "train.lr=1e-3", "train.warmup_steps=1", "checkpoint.save_final=false"]
CPU_BUCKETS = ["parallelism.reduce_bucket_size=2000000", "parallelism.allgather_bucket_size=2000000"]
ZERO3_BUCKETS = ["parallelism.prefetch_bucket_size=2000000", "parallelism.param_persistence_threshold=0"]


def env(rss_dir: Path | None = None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p)
    for k in ("FFT_DIST_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    if rss_dir is not None:
        e["FFT_DIST_BENCH_RSS_DIR"] = str(rss_dir)
    return e


def overrides(model: str, backend: str, world: int, steps: int) -> list[str]:
    out = [f"parallelism={backend}", *MODELS[model], *JOB, f"train.global_batch_size={4 * world}",
           f"train.max_steps={steps}"]
    if backend.startswith("zero"):
        out += CPU_BUCKETS + (ZERO3_BUCKETS if backend == "zero3" else [])
    return out


def estimate_row(model: str, backend: str, world: int, steps: int) -> dict:
    from fft_dist.compose import compose, resolve, to_typed
    from fft_dist.memory import Setup, estimate, model_shape, model_state_bytes

    cfg = to_typed(resolve(compose(overrides(model, backend, world, steps))))
    row = estimate(model_shape(cfg), cfg, Setup(backend, world, cfg.train.micro_batch_size, cfg.data.max_length,
                                                 cfg.model.activation_checkpointing))
    row["model_state_bytes"] = model_state_bytes(row)
    return row


def measure(model: str, backend: str, world: int, steps: int, work: Path) -> list[int]:
    """Peak RSS (bytes) of every rank of one real run."""
    rss_dir = work / f"{backend}-{world}-rss"
    rss_dir.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    args = [str(HERE / "backends.py"), "--rank-worker", *overrides(model, backend, world, steps),
            f"run.dir={work / f'{backend}-{world}'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(rss_dir), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} x{world} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in rss_dir.glob("rss-rank*.json")]
    if len(ranks) != world:
        raise RuntimeError(f"{backend} x{world}: {len(ranks)} of {world} ranks wrote their peak RSS")
    return [int(r["peak_rss_mb"] * MB) for r in sorted(ranks, key=lambda r: r["rank"])]


def table(rows: list[dict]) -> str:
    lines = ["| backend | ranks | params | est. model states / rank (MB) | est. total / rank (MB) | baseline (MB) | "
             "predicted RSS (MB) | measured peak RSS, max rank (MB) | measured / predicted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['ranks']} | {r['params'] / 1e6:.1f}M | {r['model_state_bytes'] / MB:.1f} | "
                     f"{r['estimate_total'] / MB:.1f} | {r['baseline'] / MB:.0f} | {r['predicted'] / MB:.0f} | "
                     f"{max(r['peak_rss']) / MB:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[m for m in MODELS if m != "mini"], default="tiny")
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--backends", nargs="+", default=["none", "fsdp", "zero2", "zero3"],
                    choices=["none", "fsdp", "zero2", "zero3"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fft-dist-bench-memory-"))
    rows = []
    try:
        for world in args.worlds:
            for backend in args.backends:
                if backend == "none" and world != 1:
                    continue
                est = estimate_row(args.model, backend, world, args.steps)
                # the allowance: the same job with a negligible model, less that model's own estimate
                mini = estimate_row("mini", backend, world, args.steps)["per_gpu_bytes"]["total"]
                baseline = max(measure("mini", backend, world, args.steps, work / "mini")) - mini
                peak = measure(args.model, backend, world, args.steps, work)
                total = est["per_gpu_bytes"]["total"]
                predicted = baseline + total
                rows.append({"backend": backend, "ranks": world, "params": est["params"],
                             "model_state_bytes": est["model_state_bytes"], "estimate_total": total,
                             "baseline": baseline, "predicted": predicted, "peak_rss": peak,
                             "ratio": max(peak) / predicted})
                print(f"{backend} x{world}: peak {max(peak) / MB:.0f} MB, predicted {predicted / MB:.0f} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    text = "\n".join([
        f"## Peak RSS per rank against the estimate ({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        f"- command: `python bench/memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}",
        f"- versions: {versions('torch', 'deepspeed', 'transformers')}",
        f"- job: `{' '.join(MODELS[args.model] + JOB)} train.max_steps={args.steps}`, global batch 4 x ranks, "
        "fp32, AdamW, gloo, DeepSpeed buckets at the CPU values (2e6 elements). Predicted = baseline + the "
        "estimate's per-rank total; baseline = peak RSS (max rank) of the same job with a ~37k-parameter model, "
        "less that model's own estimate.",
        "",
        table(rows),
        "",
    ])
    record(text, no_record=args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
