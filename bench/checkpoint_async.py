"""Asynchronous checkpoint save, compared before building (issue 21): DCP's async_save against a writer of our own.

    python bench/checkpoint_async.py [--params 50e6] [--rounds 5] [--dir /tmp/fft-dist-bench-async] [--no-record]

It starts itself under torch.distributed.run (2 gloo ranks, OMP_NUM_THREADS=1). Each rank holds half of a
Llama-shaped model's fp32 parameters plus AdamW's exp_avg and exp_avg_sq (3 x 4 bytes per element), and runs
interleaved rounds (the order of the variants rotates every round) of:
  baseline   a compute loop alone (matmuls standing in for training steps): its step time;
  copy       a plain copy of the rank's state into a preallocated host buffer (the floor of any staging);
  own        copy into a reused host buffer (blocking), then a thread writes it with the project's
             fft_dist.checkpoint.safetensors_io.write_safetensors (sha256 while writing, fsync), model and
             optimizer files per rank like fft_dist/checkpoint/writer.py;
  own nice   the same with the writer thread at nice 19 (setpriority on its thread id; its sha256 helper
             thread keeps the process's priority);
  dcp *      torch.distributed.checkpoint.async_save through FileSystemWriter (safetensors serialization,
             sync_files=True, a gloo group of its own): the writer's own stager (BlockingAsyncStager, a fresh
             copy per save; its cache_staged_state_dict=True pins memory, which fails without an
             accelerator), a DefaultStager kept across saves (its StateDictStager reuses the copies; pinned
             and shared memory off: no accelerator), and the same with use_async_staging=True (the copy
             runs on a thread too; "blocking" is then until its
             staging_completion, since training may not change the state before that); and the kept
             DefaultStager with DCP's own torch.save serialization instead of safetensors. FileSystemWriter
             writes no checksums, so each DCP variant is also timed with a second pass that reads the
             rank's files back and hashes them (what keeping our manifest's checksums would cost), and
             it does not keep our layout (model/ + optim/ per rank, our header metadata): it is the
             upper bound of what DCP can do here.
Blocking = from the save call until training may go on; total = until the files are durable (and for
DCP + sha256, hashed). While each background write runs, the compute loop keeps stepping; its median
step time is compared with the baseline's. Times are per rank, the slower rank per round, then the
median over rounds. It prints a table and appends it, with the command, machine and date, to
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine_info import machine, record, versions

REPO = Path(__file__).resolve().parents[1]
OWN = ("own", "own nice")
DCP = ("dcp default", "dcp cached", "dcp async-staging", "dcp cached torch_save")
VARIANTS = ("copy", *OWN, *DCP)
LOOP_N = 1024  # matmul size of the compute loop's step (2 matmuls per step)
BASELINE_STEPS = 30


def llama_50m() -> list[tuple[str, tuple[int, ...]]]:
    """The ~52M-parameter Llama used by bench/memory.py and the training mode of bench/checkpoint.py
    (tiny_llama's vocabulary 2048, hidden 640, intermediate 1728, 10 layers, 10 heads / 5 KV heads)."""
    h, inter, vocab, layers, kv = 640, 1728, 2048, 10, 320
    out = [("model.embed_tokens.weight", (vocab, h)), ("lm_head.weight", (vocab, h)), ("model.norm.weight", (h,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out


def scaled_spec(params: float) -> list[tuple[str, tuple[int, ...]]]:
    """llama_50m, with layers repeated or dropped to come near `params` elements."""
    base = llama_50m()
    head, layer = base[:3], base[3:12]
    per_layer = sum(_numel(s) for _, s in layer)
    n = max(1, round((params - sum(_numel(s) for _, s in head)) / per_layer))
    return head + [(k.replace("layers.0.", f"layers.{i}."), s) for i in range(n) for k, s in layer]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- the worker (one per rank) ---------------------------------------------------------------------------
def rank_state(spec, rank: int, world: int):
    """This rank's dim-0 shard of every parameter, with AdamW's two states: {key: tensor}, fp32."""
    import torch

    g = torch.Generator().manual_seed(rank)
    state = {}
    for name, shape in spec:
        rows = shape[0]
        lo, hi = rows * rank // world, rows * (rank + 1) // world
        local = (hi - lo, *shape[1:])
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            state[f"{name}@{kind}@{lo}"] = torch.randn(local, generator=g)
    return state


class Loop:
    """A compute loop standing in for training: a step is two matmuls; step times are recorded."""

    def __init__(self):
        import torch

        self.a, self.b = torch.randn(LOOP_N, LOOP_N), torch.randn(LOOP_N, LOOP_N)

    def step(self) -> float:
        import torch

        t0 = time.perf_counter()
        c = torch.mm(self.a, self.b)
        torch.mm(c, self.a)
        return time.perf_counter() - t0

    def run_while(self, busy, min_steps: int = 1) -> list[float]:
        out = []
        while busy() or len(out) < min_steps:
            out.append(self.step())
        return out


def sha_files(paths) -> None:
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(64 << 20):
                h.update(chunk)


def own_save(state, buffers, folder: Path, rank: int, world: int, nice: bool):
    """Copy into the reused buffers (the caller is blocked for this), then write on a thread."""
    from fft_dist.checkpoint.safetensors_io import write_safetensors

    for k, t in state.items():
        buffers[k].copy_(t)
    model = [(k, t) for k, t in buffers.items() if "@param@" in k]
    optim = [(k, t) for k, t in buffers.items() if "@param@" not in k]
    meta = {"format": "pt", "rank": str(rank), "world_size": str(world)}
    errors = []

    def write():
        try:
            if nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            (folder / "model").mkdir(parents=True, exist_ok=True)
            (folder / "optim").mkdir(parents=True, exist_ok=True)
            write_safetensors(folder / "model" / f"rank{rank:05d}.safetensors", model, metadata=meta)
            write_safetensors(folder / "optim" / f"rank{rank:05d}.safetensors", optim, metadata=meta)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    th = threading.Thread(target=write, name="bench-own-writer", daemon=True)
    th.start()
    return th, errors


def dcp_save(variant: str, state, folder: Path, rank: int, pg, stager_holder: dict):
    """Start DCP's async_save; returns (wait_staged, busy, finish) callables."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    fmt = SerializationFormat.TORCH_SAVE if variant.endswith("torch_save") else SerializationFormat.SAFETENSORS
    writer = FileSystemWriter(str(folder), sync_files=True, serialization_format=fmt)
    stager = None  # "dcp default": the writer is its own stager (BlockingAsyncStager: a fresh copy per save)
    if variant != "dcp default":  # one DefaultStager kept across saves: its StateDictStager reuses the copies
        stager = stager_holder.setdefault(variant, DefaultStager(StagingOptions(
            use_pinned_memory=False, use_shared_memory=False, use_async_staging=(variant == "dcp async-staging"),
            use_non_blocking_copy=False)))
    resp = dcp.async_save(state, checkpoint_id=str(folder), storage_writer=writer, process_group=pg, async_stager=stager)
    staged = getattr(resp, "staging_completion", None)
    upload = getattr(resp, "upload_completion", resp)
    hashed = threading.Event()

    def hash_after():
        upload.result()
        sha_files(sorted(folder.glob(f"__{rank}_*")))
        hashed.set()

    th = threading.Thread(target=hash_after, daemon=True)
    th.start()
    return (lambda: staged.result() if staged is not None else None), upload, hashed, th


def worker(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser(prog="bench/checkpoint_async.py --worker")
    p.add_argument("--params", type=float, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pg = dist.new_group(backend="gloo")  # DCP's collectives run on its thread: never on the group we barrier on
    state = rank_state(scaled_spec(args.params), rank, world)
    buffers = {k: torch.empty_like(t) for k, t in state.items()}
    copy_buf = {k: torch.empty_like(t) for k, t in state.items()}
    loop, holder = Loop(), {}
    res = {"state_bytes": sum(t.numel() * 4 for t in state.values()), "baseline_step_s": [],
           **{v: [] for v in VARIANTS}}
    for _ in range(3):
        loop.step()
    for r in range(-1, args.rounds):  # round -1 warms every path up (allocations, DCP's first plan) and is dropped
        order = list(VARIANTS[(r % len(VARIANTS)):] + VARIANTS[:(r % len(VARIANTS))])
        dist.barrier()
        base = [loop.step() for _ in range(BASELINE_STEPS)]
        if r >= 0:
            res["baseline_step_s"].append(statistics.median(base))
        for v in order:
            folder = args.dir / f"r{r}-{v.replace(' ', '-')}"
            dist.barrier()
            t0 = time.perf_counter()
            row = {}
            if v == "copy":
                for k, t in state.items():
                    copy_buf[k].copy_(t)
                row["block_s"] = row["total_s"] = time.perf_counter() - t0
            elif v in OWN:
                th, errors = own_save(state, buffers, folder, rank, world, nice=(v == "own nice"))
                row["block_s"] = time.perf_counter() - t0
                steps = loop.run_while(th.is_alive)
                th.join()
                row["total_s"] = time.perf_counter() - t0
                if errors:
                    raise errors[0]
                row["steps"] = steps
            else:
                wait_staged, upload, hashed, th = dcp_save(v, state, folder, rank, pg, holder)
                row["call_s"] = time.perf_counter() - t0
                wait_staged()
                row["block_s"] = time.perf_counter() - t0
                steps = loop.run_while(lambda: not upload.done())
                upload.result()
                row["total_s"] = time.perf_counter() - t0
                steps += loop.run_while(lambda: not hashed.is_set(), min_steps=0)
                th.join()
                row["total_sha_s"] = time.perf_counter() - t0
                row["steps"] = steps
            dist.barrier()
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            if r >= 0:
                res[v].append(row)
            dist.barrier()
        if rank == 0:
            print(f"round {r + 1}/{args.rounds}" + (" (warm-up, dropped)" if r < 0 else "") + ": "
                  + ", ".join(f"{v} {res[v][-1]['block_s']:.2f}/{res[v][-1]['total_s']:.2f} s"
                              for v in VARIANTS if r >= 0), flush=True)
    for s in holder.values():
        if hasattr(s, "close"):
            s.close()
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# -- the driver ------------------------------------------------------------------------------------------
def summarise(res: list[dict], rounds: int) -> dict:
    """Per variant: medians over rounds of the slower rank's block/total, and of the loop's step time during
    the write (each round's median over both ranks' steps) relative to the baseline step."""
    out = {"baseline_step_s": statistics.median(max(r["baseline_step_s"][i] for r in res) for i in range(rounds))}
    for v in VARIANTS:
        row = {}
        for key in ("block_s", "total_s", "total_sha_s", "call_s"):
            if key in res[0][v][0]:
                row[key] = statistics.median(max(r[v][i][key] for r in res) for i in range(rounds))
        if "steps" in res[0][v][0]:
            per_round = [statistics.median([s for r in res for s in r[v][i]["steps"]] or [float("nan")])
                         for i in range(rounds)]
            ratios = [s / max(r["baseline_step_s"][i] for r in res) for i, s in enumerate(per_round)]
            row["step_s"], row["step_ratio"] = statistics.median(per_round), statistics.median(ratios)
            row["n_steps"] = statistics.median(len(r[v][i]["steps"]) for r in res for i in range(rounds))
        out[v] = row
    return out


def table(s: dict) -> list[str]:
    copy = s["copy"]["block_s"]
    lines = ["| variant | blocking (s) | blocking / copy | total (s) | total + sha256 read-back (s) | "
             "loop step during write (ms) | vs loop alone |", "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = s[v]
        sha = f"{r['total_sha_s']:.2f}" if "total_sha_s" in r else ("(hashed while writing)" if v in OWN else "-")
        step = f"{r['step_s'] * 1e3:.1f} ({r['n_steps']:.0f} steps)" if "step_s" in r else "-"
        ratio = f"{r['step_ratio']:.2f}x" if "step_ratio" in r else "-"
        lines.append(f"| {v} | {r['block_s']:.3f} | {r['block_s'] / copy:.2f}x | {r['total_s']:.2f} | {sha} | "
                     f"{step} | {ratio} |")
    lines.append(f"| loop alone | - | - | - | - | {s['baseline_step_s'] * 1e3:.1f} | 1.00x |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, default=50e6, help="model parameters (fp32); state = 3x that")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fft-dist-bench-async")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    n_params = sum(_numel(s) for _, s in scaled_spec(args.params))
    print(f"{args.nproc} ranks, {n_params / 1e6:.1f}M params (+ AdamW states, fp32), {args.rounds} rounds "
          f"+ 1 warm-up ...", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--standalone",
           str(Path(__file__).resolve()), "--worker", "--params", str(args.params), "--rounds", str(args.rounds),
           "--dir", str(args.dir), "--out", str(args.dir / "res")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    res = [json.loads((args.dir / f"res.rank{r}.json").read_text()) for r in range(args.nproc)]
    s = summarise(res, args.rounds)
    load = os.getloadavg()
    lines = [f"## Asynchronous save: DCP async_save against our own writer ({time.strftime('%Y-%m-%d %H:%M %Z')})",
             "", f"- command: `python bench/checkpoint_async.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- machine: {machine()}; load average before the summary {load[0]:.1f} (other sessions shared the "
             f"cores: numbers taken under load)",
             f"- versions: {versions('torch', 'safetensors')}",
             f"- {args.nproc} ranks (gloo, OMP_NUM_THREADS=1), {n_params / 1e6:.1f}M params: each rank holds "
             f"{sum(r['state_bytes'] for r in res) / args.nproc / 1e6:.0f} MB (its dim-0 half of params + exp_avg "
             f"+ exp_avg_sq, fp32); median of {args.rounds} interleaved rounds (slower rank per round) after one "
             f"warm-up round; loop step = 2 matmuls of {LOOP_N}x{LOOP_N}, one thread per rank; whole bench "
             f"{time.perf_counter() - t0:.0f} s",
             "", *table(s), ""]
    record("\n".join(lines), no_record=args.no_record)
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[2:]) if sys.argv[1:2] == ["--worker"] else main())
