"""fft-dist against the loops users would otherwise run: tokens/s and whole-command wall time on CPU.

    python bench/throughput.py [--steps 20] [--repeat 3] [--variants ...] [--smoke] [--no-record]

Every variant trains the same model (conf tiny_llama, 1.3M parameters) on the same generated
token rows (each exactly --seq tokens: no padding), global batch 2 x --micro, AdamW, fp32, gloo,
OMP_NUM_THREADS=1 per rank, 2 ranks (the none / single pair: 1 process, global batch --micro).
Variants, run in interleaved rounds (round 1: all, round 2: all, ...):
  fft-dist none / fsdp / zero2 / zero3   `python -m fft_dist.cli train ...` (the user's command)
  hand single                     bench/loops.py: a plain one-process loop (`python loops.py`, no torchrun)
  hand fsdp2 / ds2 / ds3          bench/loops.py: minimal FSDP2 and DeepSpeed loops under torchrun
  hf trainer ds3                  transformers.Trainer + its DeepSpeed ZeRO-3 integration, use_cpu=True
Step time is one full loop iteration on every side (batch fetch included; see loops.hf_trainer_loop).
Steady state: the median step time over the steps after the first two, per round; the table shows
the median over rounds, the spread, and each fft-dist variant's ratio (tokens/s) to its loop.
--smoke: 1 round, 2 steps, nothing recorded (the test's mode).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine, record, versions

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# variant -> (kind, backend or loop, baseline variant for the ratio)
VARIANTS = {
    "fft-dist none": ("fft", "none", "hand single"),
    "fft-dist fsdp": ("fft", "fsdp", "hand fsdp2"),
    "fft-dist zero2": ("fft", "zero2", "hand ds2"),
    "fft-dist zero3": ("fft", "zero3", "hand ds3"),
    "hand single": ("loop", "single", None),
    "hand fsdp2": ("loop", "fsdp2", None),
    "hand ds2": ("loop", "ds2", None),
    "hand ds3": ("loop", "ds3", None),
    "hf trainer ds3": ("loop", "hf_ds3", "hand ds3"),
    # ablation for the profile (not in the default set): the hand loops do not ask for determinism
    "fft-dist fsdp nondet": ("fft", "fsdp", "hand fsdp2"),
    "fft-dist zero3 nondet": ("fft", "zero3", "hand ds3"),
}
DEFAULT_VARIANTS = [v for v in VARIANTS if not v.endswith("nondet")]
EXTRA = {"fft-dist fsdp nondet": ["train.deterministic=false"], "fft-dist zero3 nondet": ["train.deterministic=false"]}
WARMUP_STEPS = 2


def model_arch() -> dict:
    import yaml

    return yaml.safe_load((REPO / "fft_dist" / "conf" / "model" / "tiny_llama.yaml").read_text())["arch"]


def write_rows(path: Path, *, n: int, seq: int) -> None:
    """Seeded random-word text, long enough that every row tokenises to more than `seq` tokens."""
    rng = random.Random(0)
    words = ["model", "shard", "gradient", "tensor", "rank", "the", "of", "layer", "return", "value", "for",
             "optimizer", "state", "memory", "def", "self", "import", "loss", "batch", "step"]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq * 2))}) + "\n")


def env(extra_path: str = "") -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", ""), extra_path) if p)
    for k in ("FFT_DIST_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def ranks_of(variant: str) -> int:
    """1 for the single-process pair (fft-dist none, the plain loop), else 2."""
    return 1 if VARIANTS[variant][1] in ("none", "single") else 2


def command(variant: str, *, work: Path, data: Path, arch: Path, steps: int, micro: int, seq: int) -> tuple[list, Path]:
    kind, name, _ = VARIANTS[variant]
    ranks = ranks_of(variant)
    if kind == "fft":
        run_dir = work / "run"
        a = json.loads(arch.read_text())
        cmd = [sys.executable, "-m", "fft_dist.cli", "train", f"parallelism={name}", f"launcher.nproc_per_node={ranks}",
               "model=tiny_llama", *(f"model.arch.{k}={v}" for k, v in a.items() if k != "model_type"),
               "data=stdlib_text", f"data.path={data}", f"data.max_length={seq}", "data.eval_fraction=0",
               "data.shuffle=false", "eval.every_steps=0", f"train.max_steps={steps}",
               f"train.global_batch_size={ranks * micro}", f"train.micro_batch_size={micro}", "train.lr=1e-3",
               "train.lr_schedule=constant", "checkpoint.save_final=false", f"run.dir={run_dir}",
               *EXTRA.get(variant, [])]
        return cmd, run_dir / "metrics.jsonl"
    out = work / "times.json"
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd = [sys.executable, *launcher, str(HERE / "loops.py"), "--loop", name, "--data", str(data), "--arch", str(arch), "--steps", str(steps),
           "--micro", str(micro), "--seq", str(seq), "--out", str(out)]
    return cmd, out


def step_times(variant: str, out: Path) -> tuple[list[float], int]:
    """(seconds per step, tokens per step) from fft-dist's metrics.jsonl or the loop's JSON."""
    if VARIANTS[variant][0] == "fft":
        rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if "loss" in r]
        tokens = rows[-1]["tokens_seen"] // rows[-1]["step"]
        return [tokens / r["tokens_per_s"] for r in rows], tokens
    d = json.loads(out.read_text())
    return d["step_s"], d["tokens_per_step"]


def has_accelerate(extra_path: str) -> bool:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('accelerate') is None)"
    return subprocess.run([sys.executable, "-c", code], env=env(extra_path)).returncode == 0


def run_once(variant: str, **kw) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fft-dist-tp-", dir=kw.pop("root")))
    kw_extra = kw.pop("extra_path")
    cmd, out = command(variant, work=work, **kw)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env(kw_extra), capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    times, tokens = step_times(variant, out)
    steady = times[WARMUP_STEPS:] or times
    return {"tokens_per_s": tokens / statistics.median(steady), "wall_s": wall, "steps": len(times)}


def summarise(rounds: dict[str, list[dict]]) -> list[dict]:
    out = []
    med = {v: statistics.median(r["tokens_per_s"] for r in runs) for v, runs in rounds.items()}
    for v, runs in rounds.items():
        tps = [r["tokens_per_s"] for r in runs]
        base = VARIANTS[v][2]
        row = {"variant": v, "tokens_per_s": med[v], "min": min(tps), "max": max(tps),
               "wall_s": statistics.median(r["wall_s"] for r in runs), "ratio": None, "paired": None}
        if base in rounds:
            row["ratio"] = med[v] / med[base]
            pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs, rounds[base])]
            row["paired"] = (min(pairs), max(pairs))
        row["base"] = base if base in rounds else None
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| variant | tokens/s (median) | tokens/s (min-max) | whole command (s, median) | "
             "ratio to its loop (median; per round min-max) |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else (f"{r['ratio']:.2f}x {r['base']} "
                                                f"({r['paired'][0]:.2f}-{r['paired'][1]:.2f})")
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['min']:.0f}-{r['max']:.0f} | "
                     f"{r['wall_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--smoke", action="store_true", help="1 round of 2 steps, not recorded")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--json", help="also write the summary rows to this file")
    ap.add_argument("--hf-path", default="", help="a folder with `accelerate` (Trainer needs it; fft-dist does not), "
                    "e.g. from `pip install --no-deps --target DIR accelerate`; without it the Trainer variant is skipped")
    args = ap.parse_args(argv)
    notes = []
    if "hf trainer ds3" in args.variants and not has_accelerate(args.hf_path):
        args.variants.remove("hf trainer ds3")
        notes.append("HF Trainer skipped: `accelerate` is not importable (pass --hf-path).")
    if args.smoke:
        args.repeat, args.steps, args.no_record = 1, 2, True
    root = Path(tempfile.mkdtemp(prefix="fft-dist-bench-throughput-"))
    try:
        data, arch = root / "rows.jsonl", root / "arch.json"
        write_rows(data, n=max(64, 2 * args.micro * args.steps), seq=args.seq)
        arch.write_text(json.dumps(model_arch()))
        rounds: dict[str, list[dict]] = {v: [] for v in args.variants}
        for i in range(args.repeat):
            for v in args.variants:
                r = run_once(v, root=root, extra_path=args.hf_path, data=data, arch=arch, steps=args.steps, micro=args.micro, seq=args.seq)
                print(f"round {i + 1}/{args.repeat} {v}: {r['tokens_per_s']:.0f} tokens/s, {r['wall_s']:.1f} s",
                      flush=True)
                rounds[v].append(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = summarise(rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    text = "\n".join([
        f"## Throughput against hand-written loops and HF Trainer ({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        f"- command: `python bench/throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}",
        f"- versions: {versions('torch', 'deepspeed', 'transformers')}",
        f"- job: tiny_llama (1.3M params), {args.steps} steps, 2 ranks x micro {args.micro} x seq {args.seq} "
        "(fft-dist none and the single loop: 1 process x micro) "
        "(identical generated token rows, no padding), AdamW, fp32, gloo, OMP_NUM_THREADS=1 per rank; "
        f"{args.repeat} interleaved round(s); tokens/s from each round's median step after the first "
        f"{WARMUP_STEPS}. HF Trainer ran its DeepSpeed ZeRO-3 integration (use_cpu=True, torchrun), not FSDP "
        "(on CPU its FSDP path falls back to DDP).",
        *(f"- {n}" for n in notes),
        "",
        table(rows),
        "",
    ])
    record(text, no_record=args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
