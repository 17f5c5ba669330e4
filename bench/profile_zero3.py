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
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from profile_fsdp import PHASES, _current, close_step, profile, timed  # noqa: E402


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
    from fft_dist.rank import run_worker

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


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--fft-rank", "--hf-rank"):
        (fft_rank if sys.argv[1] == "--fft-rank" else hf_rank)(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hf-path", default="", help="a folder with `accelerate` (see throughput.py)")
    args = ap.parse_args()
    profile(Path(__file__).resolve(), {"fft": ("fft-dist zero3", "fft-dist zero3", "--fft-rank"),
                                       "hf": ("hf trainer ds3", "HF Trainer ds3", "--hf-rank")},
            steps=args.steps, repeat=args.repeat, hf_path=args.hf_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
