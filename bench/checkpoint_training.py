"""The training mode of bench/checkpoint.py: synchronous against asynchronous saves in real fft-dist runs (issue 21).

    python bench/checkpoint.py --train [--modes off on] [--rounds 5] [--steps 10] [--every 3] [--no-record]
    python bench/checkpoint.py --train --tiny --rounds 1 --modes off --no-record    # a quick check of the harness

Each round trains once per mode (the order alternates between rounds): `python -m fft_dist.cli train` with
2 ranks, parallelism=fsdp, a ~52M-parameter Llama (tiny_llama's vocabulary 2048; hidden 640, intermediate
1728, 10 layers, 10 heads / 5 KV heads), fp32, AdamW, CPU/gloo, OMP_NUM_THREADS=1 per rank, saving every
--every steps with `checkpoint.async_save=<mode>`. From each run's metrics.jsonl it reads the checkpoint
records (`ckpt_block_s`: seconds training was blocked; `ckpt_write_s`: write + commit) and the step times
(tokens seen in the step / tokens_per_s: the step alone, not the save). In the same round, before the runs,
2 processes copy a rank's state (its half of params + exp_avg + exp_avg_sq, the same dim-0 shapes) into
preallocated buffers at once: the plain copy time the acceptance check compares with.

Steps a write spans (asynchronous saves only): after a save at step k, steps k+1, k+2, ... while the step times summed before each
one are under that save's ckpt_write_s (a step that starts before the write ends is spanned). A step
without a write: a step of the synchronous runs (same job, nothing in the background) after the first two
(warm-up) and before the last; without off runs, such a step of the async runs that no write spans.
Acceptance (issue 21): async blocking <= 1.5 x copy + 50 ms; median step over spanned steps <= 1.3 x the
median step without a write. A build without `checkpoint.async_save` runs
`--modes off` with the option left out (today's synchronous save); one that logs no `ckpt_block_s`
reports the blocking as n/a.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import job_env, machine, record, versions

REPO = Path(__file__).resolve().parents[1]
ARCH_50M = {"hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 10, "num_attention_heads": 10,
            "num_key_value_heads": 5}
WARMUP = 2


def arch_overrides(tiny: bool) -> list[str]:
    return [] if tiny else ["model.name=llama_50m", *(f"model.arch.{k}={v}" for k, v in ARCH_50M.items())]


def rank_shapes(tiny: bool) -> list[tuple[int, ...]]:
    """Rank 0's dim-0 halves of the model's parameters (FSDP2 shards dim 0), each x3 (param + 2 Adam states)."""
    import yaml

    a = yaml.safe_load((REPO / "fft_dist" / "conf" / "model" / "tiny_llama.yaml").read_text())["arch"]
    if not tiny:
        a.update(ARCH_50M)
    h, inter, v = a["hidden_size"], a["intermediate_size"], a["vocab_size"]
    kv = h // a["num_attention_heads"] * a["num_key_value_heads"]
    shapes = [(v, h), (v, h), (h,)]
    for _ in range(a["num_hidden_layers"]):
        shapes += [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return [((s[0] + 1) // 2, *s[1:]) for s in shapes for _ in range(3)]


def _copy_rank(shapes, barrier, out, idx: int) -> None:
    import torch

    torch.set_num_threads(1)
    src = [torch.full(s, 1.5) for s in shapes]
    dst = [torch.empty(s) for s in shapes]
    for a, b in zip(dst, src):  # touch the buffers once: a staging buffer is allocated once and reused
        a.copy_(b)
    barrier.wait()
    t0 = time.perf_counter()
    for a, b in zip(dst, src):
        a.copy_(b)
    out[idx] = time.perf_counter() - t0


def copy_time(shapes, nproc: int = 2) -> float:
    """Seconds for `nproc` processes, started together, to copy a rank's state into preallocated buffers
    (the slowest of them)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(nproc), ctx.Array("d", nproc)
    procs = [ctx.Process(target=_copy_rank, args=(shapes, barrier, out, i)) for i in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"copy probe failed ({p.exitcode})")
    return max(out)


def knows_async(src: Path) -> bool:
    code = ("import sys; from fft_dist.config.checkpoint import CheckpointConfig as C; "
            "sys.exit(0 if 'async_save' in C.__dataclass_fields__ else 1)")
    return subprocess.run([sys.executable, "-c", code], env=job_env(src), cwd=src).returncode == 0


def train_once(mode: str, *, src: Path, work: Path, args, with_option: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{mode}-", dir=work))
    cmd = [sys.executable, "-m", "fft_dist.cli", "train", "parallelism=fsdp", "launcher.nproc_per_node=2",
           "model=tiny_llama", *arch_overrides(args.tiny), "data=stdlib_text", f"data.max_length={args.seq}",
           "data.eval_fraction=0", "eval.every_steps=0", f"train.max_steps={args.steps}",
           f"train.micro_batch_size={args.micro}", f"train.global_batch_size={2 * args.micro}", "train.lr=1e-4",
           "train.lr_schedule=constant", "train.warmup_steps=0", f"checkpoint.every_steps={args.every}",
           "checkpoint.save_final=false", "checkpoint.keep_last=2", f"run.dir={run_dir}",
           *([f"checkpoint.async_save={mode}"] if with_option else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=src, env=job_env(src), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mode {mode} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(run_dir, ignore_errors=True)
    background = mode == "on" or (mode == "auto" and "checkpoints are asynchronous" in proc.stdout + proc.stderr)
    return {**parse(rows, background), "wall_s": wall, "background": background}


def parse(rows: list[dict], background: bool) -> dict:
    """Step times, the saves' block/write seconds and which steps each write spans (none when the save is
    synchronous: its write is inside the blocking time)."""
    steps, seen = {}, 0
    for r in rows:
        if "loss" in r and "tokens_per_s" in r:
            steps[r["step"]] = (r["tokens_seen"] - seen) / r["tokens_per_s"]
            seen = r["tokens_seen"]
    saves = {}
    for r in rows:
        if "ckpt_block_s" in r:
            saves[int(r.get("checkpoint_step", r["step"]))] = (r["ckpt_block_s"], r.get("ckpt_write_s"))
    spanned = set()
    for k, (_, write) in saves.items() if background else ():
        elapsed, j = 0.0, k + 1
        while write is not None and j in steps and elapsed < write:
            spanned.add(j)
            elapsed += steps[j]
            j += 1
    last = max(steps) if steps else 0
    quiet = [t for s, t in steps.items() if s > WARMUP and s < last and s not in spanned]
    return {"steps": steps, "saves": saves, "spanned": sorted(spanned),
            "block_s": [b for b, _ in saves.values()], "write_s": [w for _, w in saves.values() if w is not None],
            "step_quiet_s": statistics.median(quiet) if quiet else None,
            "step_spanned_s": statistics.median([steps[s] for s in spanned]) if spanned else None}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, unit: str = " s", nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}{unit}"


def summary(rounds: dict[str, list[dict]], copies: list[float]) -> tuple[list[str], list[str]]:
    copy = statistics.median(copies)
    med = {m: {"block": _med(_med(r["block_s"]) for r in runs), "write": _med(_med(r["write_s"]) for r in runs),
               "quiet": _med(r["step_quiet_s"] for r in runs), "spanned": _med(r["step_spanned_s"] for r in runs),
               "wall": _med(r["wall_s"] for r in runs), "n_saves": _med(len(r["saves"]) for r in runs)}
           for m, runs in rounds.items()}
    rows = ["| measure | " + " | ".join(f"async_save={m}" for m in rounds) + " |",
            "|---|" + "---|" * len(rounds)]
    for key, label in (("block", "blocking per save (ckpt_block_s)"), ("write", "write + commit (ckpt_write_s)"),
                       ("quiet", "step without a write"), ("spanned", "step during a write"),
                       ("wall", "whole run (launch included)")):
        rows.append(f"| {label}, median | " + " | ".join(_fmt(med[m][key]) for m in rounds) + " |")
    rows.append("| saves logged per run | " + " | ".join(_fmt(med[m]["n_saves"], "", 0) for m in rounds) + " |")
    checks = [f"plain copy of a rank's state (2 processes at once), median of {len(copies)}: {copy:.3f} s"]
    if "off" in med and "on" in med and med["off"]["block"] and med["on"]["block"] is not None:
        checks.append(f"blocking ratio async/sync: {med['on']['block'] / med['off']['block']:.3f} "
                      f"({med['on']['block']:.3f} s / {med['off']['block']:.3f} s)")
    if "on" in med:
        b, limit = med["on"]["block"], 1.5 * copy + 0.05
        checks.append(("n/a" if b is None else "PASS" if b <= limit else "FAIL")
                      + f": async blocking {_fmt(b)} <= 1.5 x copy + 50 ms = {limit:.3f} s")
        # a step without a write: the synchronous runs' steps (same job, nothing in the background), else
        # the asynchronous runs' steps that no write spans
        sp = med["on"]["spanned"]
        q, ref = (med["off"]["quiet"], "async_save=off runs") if med.get("off", {}).get("quiet") else \
            (med["on"]["quiet"], "async_save=on runs, steps no write spans")
        ok = None if sp is None or q is None else sp <= 1.3 * q
        checks.append(("n/a" if ok is None else "PASS" if ok else "FAIL")
                      + f": step during a write {_fmt(sp)} <= 1.3 x step without one "
                      + ("(n/a)" if q is None else f"({ref}) = {1.3 * q:.3f} s"))
    return rows, checks


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/checkpoint.py --train", description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on", "auto"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=9, help="train.max_steps of each run")
    p.add_argument("--every", type=int, default=3, help="checkpoint.every_steps")
    p.add_argument("--micro", type=int, default=1, help="micro batch per rank (global = 2 x micro)")
    p.add_argument("--seq", type=int, default=64, help="data.max_length")
    p.add_argument("--tiny", action="store_true", help="tiny_llama (1M params) instead of the 52M model: a harness check")
    p.add_argument("--src", type=Path, default=REPO, help="the fft-dist tree to run (default: this one)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fft-dist-bench-ckpt-train")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    src = args.src.resolve()
    with_option = knows_async(src)
    if not with_option and args.modes != ["off"]:
        print(f"{src} has no checkpoint.async_save yet: run with --modes off", file=sys.stderr)
        return 2
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    shapes = rank_shapes(args.tiny)
    state_mb = sum(_numel(s) for s in shapes) * 4 / 1e6
    print(f"2 ranks, fsdp, {'tiny_llama' if args.tiny else 'llama 52M'}; rank state {state_mb:.0f} MB; modes "
          f"{' '.join(args.modes)}; {args.rounds} rounds of {args.steps} steps, a save every {args.every}", flush=True)
    rounds: dict[str, list[dict]] = {m: [] for m in args.modes}
    copies = []
    t_all = time.perf_counter()
    try:
        for i in range(args.rounds):
            copies.append(copy_time(shapes))
            order = args.modes if i % 2 == 0 else args.modes[::-1]
            for m in order:
                r = train_once(m, src=src, work=args.dir, args=args, with_option=with_option)
                rounds[m].append(r)
            print(f"round {i + 1}/{args.rounds}: copy {copies[-1]:.3f} s; " + "; ".join(
                f"{m}: block {_fmt(_med(rounds[m][-1]['block_s']))}, write {_fmt(_med(rounds[m][-1]['write_s']))}, "
                f"step {_fmt(rounds[m][-1]['step_quiet_s'])} / during write {_fmt(rounds[m][-1]['step_spanned_s'])}, "
                f"run {rounds[m][-1]['wall_s']:.0f} s" for m in args.modes), flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    rows, checks = summary(rounds, copies)
    model = " ".join(["model=tiny_llama", *arch_overrides(args.tiny)])
    text = "\n".join([
        f"## Checkpoint saves in training: synchronous against asynchronous ({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "", f"- command: `python bench/checkpoint.py --train {' '.join(argv)}`".rstrip(),
        f"- machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end (the 2 cores were shared with "
        "other sessions: numbers taken under load)",
        f"- versions: {versions('torch', 'safetensors')}; tree {src}",
        f"- job: `parallelism=fsdp launcher.nproc_per_node=2 {model} data=stdlib_text data.max_length={args.seq} "
        f"train.micro_batch_size={args.micro} train.max_steps={args.steps} checkpoint.every_steps={args.every}`, "
        f"fp32, AdamW, gloo, OMP_NUM_THREADS=1; rank state {state_mb:.0f} MB; {args.rounds} interleaved rounds, "
        f"medians (of each run's median); whole bench {time.perf_counter() - t_all:.0f} s",
        "", *rows, "", *(f"- {c}" for c in checks), ""])
    record(text, no_record=args.no_record)
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
