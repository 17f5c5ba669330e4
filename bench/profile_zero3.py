"""Where an fft-dist zero3 step goes, next to HF Trainer's DeepSpeed ZeRO-3 path (per-phase timers).

    python bench/profile_zero3.py [--steps 20] [--repeat 3]

bench/throughput.py's job on 2 ranks, interleaved rounds. Both sides run the same DeepSpeed engine,
so the timers wrap DeepSpeedEngine.forward / backward / step on both (by patching, not by editing
either package); the rest of each side's step is named separately: fft-dist's collation and its
token-count / loss all-reduces, Trainer's batch fetch (get_batch_samples, which also counts the
batch's tokens). "whole step" on both sides is one full loop iteration, batch fetch included (for
Trainer: from one on_step_end to the next). Prints rank 0's median ms per phase over the steps
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
from profile_fsdp import PHASES, _current, close_step, timed  # noqa: E402
from throughput import REPO, command, env, model_arch, write_rows  # noqa: E402


def patch_engine() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    DeepSpeedEngine.forward = timed("engine forward", DeepSpeedEngine.forward)
    DeepSpeedEngine.backward = timed("engine backward", DeepSpeedEngine.backward)
    DeepSpeedEngine.step = timed("engine step", DeepSpeedEngine.step)


def write_phases() -> None:
    if os.environ.get("RANK", "0") == "0":
        Path(os.environ["PROFILE_OUT"]).write_text(json.dumps(PHASES))


def fft_rank(argv: list[str]) -> None:
    import fft_dist.trainer as tr

    patch_engine()
    tr.all_reduce_sum = timed("all-reduce counts+loss", tr.all_reduce_sum)
    import dataclasses

    import fft_dist.loss as fl

    fl.TOKENS = dataclasses.replace(fl.TOKENS, loss_sum=timed("loss", fl.TOKENS.loss_sum))
    tr.Trainer._micro_batches = timed("collate / batch fetch", tr.Trainer._micro_batches)
    step = tr.Trainer.train_step

    def train_step(self, i):
        t0 = time.perf_counter()
        out = step(self, i)
        _current["whole step"] += time.perf_counter() - t0
        close_step()
        return out

    tr.Trainer.train_step = train_step
    from fft_dist.dist import exit_rank
    from fft_dist.preemption import StopSignal
    from fft_dist.worker import run_worker

    code = run_worker(argv, stop=StopSignal())
    write_phases()
    exit_rank(code)


def hf_rank(argv: list[str]) -> None:
    import loops
    import transformers

    patch_engine()
    transformers.Trainer.get_batch_samples = timed("collate / batch fetch", transformers.Trainer.get_batch_samples)
    last = [None]

    class Cycle(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            if last[0] is not None:
                _current["whole step"] += now - last[0]
                close_step()
            else:
                _current.clear()
            last[0] = now

    real_init = transformers.Trainer.__init__

    def init(self, *a, callbacks=None, **k):  # (a subclass would not be seen: transformers is a lazy module)
        real_init(self, *a, callbacks=[*(callbacks or []), Cycle()], **k)

    transformers.Trainer.__init__ = init
    sys.argv = ["loops.py", *argv]
    loops.main()
    write_phases()


def run(kind: str, root: Path, data: Path, arch: Path, steps: int, i: int) -> dict[str, list[float]]:
    work = root / f"{kind}-{i}"
    work.mkdir()
    variant = "fft-dist zero3" if kind == "fft" else "hf trainer ds3"
    cmd, _ = command(variant, work=work, data=data, arch=arch, steps=steps, micro=4, seq=128)
    if kind == "fft":
        overrides = [a for a in cmd[cmd.index("train") + 1:] if a != "launcher.nproc_per_node=2"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), "--fft-rank", *overrides]
    else:
        at = cmd.index(str(HERE / "loops.py"))
        cmd = [*cmd[:at], str(Path(__file__).resolve()), "--hf-rank", *cmd[at + 1:]]
    e = env(os.environ.get("HF_PATH", ""))
    e["PROFILE_OUT"] = str(work / "phases.json")
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads((work / "phases.json").read_text())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--fft-rank", "--hf-rank"):
        (fft_rank if sys.argv[1] == "--fft-rank" else hf_rank)(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hf-path", default="", help="a folder with `accelerate` (see throughput.py)")
    args = ap.parse_args()
    os.environ["HF_PATH"] = args.hf_path
    root = Path(tempfile.mkdtemp(prefix="fft-dist-profile-z3-"))
    data, arch = root / "rows.jsonl", root / "arch.json"
    write_rows(data, n=max(64, 8 * args.steps), seq=128)
    arch.write_text(json.dumps(model_arch()))
    med: dict[str, dict[str, list[float]]] = {"fft": defaultdict(list), "hf": defaultdict(list)}
    for i in range(args.repeat):
        for kind in ("fft", "hf"):
            for phase, times in run(kind, root, data, arch, args.steps, i).items():
                med[kind][phase].append(statistics.median(times[2:] or times) * 1e3)
    phases = list(dict.fromkeys([*med["fft"], *med["hf"]]))
    print(f"| phase (ms, median of {args.repeat} rounds' medians) | fft-dist zero3 | HF Trainer ds3 |\n|---|---|---|")
    for ph in phases:
        cells = [f"{statistics.median(med[k][ph]):.1f}" if med[k].get(ph) else "-" for k in ("fft", "hf")]
        print(f"| {ph} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
