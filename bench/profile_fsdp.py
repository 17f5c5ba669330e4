"""Where an fft-dist fsdp step spends its time, next to the hand-written FSDP2 loop (per-phase timers).

    python bench/profile_fsdp.py [--steps 20] [--repeat 3]

Runs bench/throughput.py's job (same rows, model, batch) in interleaved rounds: fft-dist through
`torch.distributed.run ... bench/profile_fsdp.py --rank` (fft_dist.train's own main, with timers
wrapped around the trainer's phases by patching, not by editing the package), and the hand loop
of bench/loops.py with the same phase timers. Prints rank 0's median ms per phase over the steps
after the first two.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import REPO, command, env, model_arch, write_rows  # noqa: E402

PHASES: dict[str, list[float]] = defaultdict(list)
_current: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _current[name] += time.perf_counter() - t0
    return wrapper


def close_step() -> None:
    for k, v in _current.items():
        PHASES[k].append(v)
    _current.clear()


def fft_rank(argv: list[str]) -> None:
    """One fft-dist rank with timers around collation, the count/loss all-reduces, forward, loss, backward, step."""
    import fft_dist.trainer as tr
    from fft_dist.strategy.fsdp import FSDPStrategy

    tr.all_reduce_sum = timed("all-reduce counts+loss", tr.all_reduce_sum)
    import dataclasses

    import fft_dist.loss as fl

    fl.TOKENS = dataclasses.replace(fl.TOKENS, loss_sum=timed("loss", fl.TOKENS.loss_sum))
    tr.Trainer._micro_batches = timed("collate", tr.Trainer._micro_batches)
    FSDPStrategy.forward = timed("forward", FSDPStrategy.forward)
    FSDPStrategy.backward = timed("backward", FSDPStrategy.backward)
    FSDPStrategy.step = timed("clip+optimizer step", FSDPStrategy.step)
    step = tr.Trainer.train_step

    def train_step(self, i):
        t0 = time.perf_counter()
        out = step(self, i)
        _current["whole step"] += time.perf_counter() - t0
        close_step()
        return out

    tr.Trainer.train_step = train_step
    out = os.environ["PROFILE_OUT"]
    from fft_dist.dist import exit_rank
    from fft_dist.preemption import StopSignal
    from fft_dist.rank import run_worker

    code = run_worker(argv, stop=StopSignal())
    if os.environ.get("RANK", "0") == "0":
        Path(out).write_text(json.dumps(PHASES))
    exit_rank(code)  # skips interpreter finalisation, so write the timings first


def hand_rank(argv: list[str]) -> None:
    """bench/loops.py's FSDP2 loop, with the same phase names."""
    import torch
    import torch.distributed as dist
    from loops import CLIP, batches, build_model, optimizer, token_rows
    from torch.distributed.fsdp import fully_shard

    p = argparse.ArgumentParser()
    for a in ("--data", "--arch", "--out"):
        p.add_argument(a)
    for a in ("--steps", "--micro", "--seq"):
        p.add_argument(a, type=int)
    args, _ = p.parse_known_args(argv)
    dist.init_process_group("gloo")
    rows = token_rows(args.data, args.seq)
    model = build_model(args.arch)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = optimizer(model)
    for ids in batches(rows, rank=dist.get_rank(), world=dist.get_world_size(), micro=args.micro, steps=args.steps):
        t0 = time.perf_counter()
        out = timed("forward", model)(input_ids=ids)
        loss = timed("loss", lambda: model.loss_function(out.logits, ids, vocab_size=model.config.vocab_size))()
        timed("backward", loss.backward)()

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
        timed("clip+optimizer step", step)()
        _current["whole step"] += time.perf_counter() - t0
        close_step()
    if dist.get_rank() == 0:
        Path(os.environ["PROFILE_OUT"]).write_text(json.dumps(PHASES))
    dist.barrier()
    dist.destroy_process_group()


def run(script: Path, side: tuple[str, str, str], kind: str, root: Path, data: Path, arch: Path, steps: int, i: int,
        hf_path: str = "") -> dict[str, list[float]]:
    """One round of one side through `script`'s rank mode; `side` is (variant, column label, rank flag)."""
    work = root / f"{kind}-{i}"
    work.mkdir()
    variant, _, flag = side
    cmd, _ = command(variant, work=work, data=data, arch=arch, steps=steps, micro=4, seq=128)
    if kind == "fft":  # the same overrides, through the script's rank mode instead of the CLI launcher
        overrides = [a for a in cmd[cmd.index("train") + 1:] if a != "launcher.nproc_per_node=2"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), flag, *overrides]
    else:
        at = cmd.index(str(HERE / "loops.py"))
        cmd = [*cmd[:at], str(script), flag, *cmd[at + 1:]]
    e = env(hf_path)
    e["PROFILE_OUT"] = str(work / "phases.json")
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads((work / "phases.json").read_text())


def profile(script: Path, sides: dict[str, tuple[str, str, str]], *, steps: int, repeat: int,
            hf_path: str = "") -> None:
    """Interleaved rounds of both sides (kind -> (variant, column label, rank flag)); prints the phase table."""
    root = Path(tempfile.mkdtemp(prefix=f"fft-dist-{script.stem}-"))
    data, arch = root / "rows.jsonl", root / "arch.json"
    write_rows(data, n=max(64, 8 * steps), seq=128)
    arch.write_text(json.dumps(model_arch()))
    med: dict[str, dict[str, list[float]]] = {kind: defaultdict(list) for kind in sides}
    for i in range(repeat):
        for kind, side in sides.items():
            for phase, times in run(script, side, kind, root, data, arch, steps, i, hf_path).items():
                med[kind][phase].append(statistics.median(times[2:] or times) * 1e3)
    phases = list(dict.fromkeys(ph for kind in sides for ph in med[kind]))
    labels = " | ".join(label for _, label, _ in sides.values())
    print(f"| phase (ms, median of {repeat} rounds' medians) | {labels} |\n|---|---|---|")
    for ph in phases:
        cells = [f"{statistics.median(med[k][ph]):.1f}" if med[k].get(ph) else "-" for k in sides]
        print(f"| {ph} | {' | '.join(cells)} |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--fft-rank", "--hand-rank"):
        (fft_rank if sys.argv[1] == "--fft-rank" else hand_rank)(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    profile(Path(__file__).resolve(), {"fft": ("fft-dist fsdp", "fft-dist fsdp", "--fft-rank"),
                                       "hand": ("hand fsdp2", "hand FSDP2", "--hand-rank")},
            steps=args.steps, repeat=args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
