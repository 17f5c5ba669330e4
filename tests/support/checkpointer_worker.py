"""Worker for tests/e2e/test_checkpointer.py: the Checkpointer's phase API on 2 real gloo ranks.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/support/checkpointer_worker.py --root DIR --out PREFIX

Rank r writes {PREFIX}.rank{r}.json with what it saw: the phases' order, the groups its collectives
ran on, the timings returned, and the errors raised. The test asserts on those and on the folders.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"model.a.weight": (13, 8), "model.b.weight": (7,), "model.c.weight": (5, 3)}
RUN = "c0ffee00c0ffee00"


class Deferred:
    """A runner that runs write + commit only when asked for the result: a stand-in for a background one."""

    def __init__(self, job):
        self.job, self.ran, self.value = job, False, None

    def done(self) -> bool:
        return self.ran

    def result(self):
        if not self.ran:
            self.ran = True
            self.value = self.job()
        return self.value


def recording(events: list[str]):
    from fft_dist.checkpoint import Checkpointer

    class Recording(Checkpointer):
        def stage(self, job, strategy):
            events.append(f"stage {job.step}")
            super().stage(job, strategy)

        def write(self, job):
            events.append(f"write {job.step}")
            super().write(job)

        def commit(self, job):
            events.append(f"commit {job.step}")
            super().commit(job)

    return Recording


def main() -> int:
    import torch.distributed as dist

    from checkpoint_worker import FlatShardStrategy
    from fft_dist import checkpoint as ckpt
    from fft_dist.checkpoint import checkpointer as cp_mod
    from fft_dist.checkpoint import collective

    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(args.root)
    out: dict = {"rank": rank}

    groups: list = []  # the group of every small collective a save makes
    for mod in (cp_mod, collective):
        real = mod.all_gather_small

        def spy(obj, group=None, _real=real):
            groups.append(group)
            return _real(obj, group=group)

        mod.all_gather_small = spy

    def strategy(steps: int) -> FlatShardStrategy:
        s = FlatShardStrategy(dict(SHAPES), split="uneven", rank=rank, world=world)
        for k in range(steps):
            s.train_step(k)
        return s

    try:
        # A: synchronous, on its own group; best bookkeeping; close() is idempotent
        events: list[str] = []
        saver = recording(events)(root / "sync", run_id=RUN, keep_last=1, keep_best=True, timeout_s=120)
        out["own_group_backend"] = dist.get_backend(saver.group)
        out["own_group_is_world"] = saver.group is dist.group.WORLD or saver.group is None
        seen_best: list = []

        def train_state(step):
            return lambda best: (seen_best.append(best), {"step": step, "best": best})[1]

        r2 = saver.save(strategy(2), 2, train_state(2), best=True, meta={"backend": "flatshard-uneven"})
        r4 = saver.save(strategy(4), 4, train_state(4), meta={"backend": "flatshard-uneven"})
        out["sync"] = {"events": events, "steps": [r2.step, r4.step], "paths": [str(r2.path), str(r4.path)],
                       "timings": [asdict(r2.timings), asdict(r4.timings)], "seen_best": seen_best,
                       "wait_is_r4": saver.wait() is r4, "last": str(saver.last), "best": saver.best}
        out["sync"]["close"] = [saver.close() is r4, saver.close() is r4, saver.closed]
        try:
            saver.save(strategy(4), 6, {"step": 6})
        except RuntimeError as e:
            out["sync"]["after_close"] = str(e)
        out["groups_all_own"] = bool(groups) and all(g is saver.group for g in groups)
        out["group_calls"] = len(groups)

        # B: a deferred runner: save() stages only; the next save, wait() and close() run what is pending
        events = []
        saver = recording(events)(root / "deferred", run_id=RUN, keep_last=5, timeout_s=120, runner=Deferred)
        first = saver.save(strategy(2), 2, {"step": 2}, meta={"backend": "flatshard-uneven"})
        out["deferred"] = {"first_returned": first, "committed_after_save": (root / "deferred" / "step-0000002").exists()}
        dist.barrier()
        events.append("ask 4")
        saver.save(strategy(4), 4, {"step": 4}, meta={"backend": "flatshard-uneven"})
        out["deferred"]["step2_after_second_save"] = (root / "deferred" / "step-0000002").is_dir()
        out["deferred"]["step4_before_close"] = (root / "deferred" / "step-0000004").exists()
        out["deferred"]["newest_step"] = saver.newest_step
        out["deferred"]["last_before_close"] = saver.last_step
        events.append("close")
        closed = saver.close()
        events.append("close again")
        again = saver.close()
        out["deferred"].update(events=events, closed_step=closed.step, again_same=again is closed,
                               last=saver.last_step, blocked=closed.timings.blocked - closed.timings.waited,  # its own blocking
                               total=closed.timings.total)

        # C: the one-off save of the same state, for a byte comparison with B's step 4
        ckpt.save_checkpoint(strategy(4), ckpt_root=root / "oneoff", step=4, train_state={"step": 4}, keep_last=5,
                             run_id=RUN, meta={"backend": "flatshard-uneven"})

        # D: a failing save in flight raises at wait(), on every rank, and leaves no temporary folder
        saver = cp_mod.Checkpointer(root / "failing", run_id=RUN, keep_last=2, timeout_s=120, runner=Deferred)
        bad = strategy(1)
        if rank == 1:
            next(iter(bad.params.values())).data.view(-1)[0] = float("nan")
        out["failing"] = {"save_returned": saver.save(bad, 1, {"step": 1})}
        try:
            saver.wait()
        except ckpt.CheckpointError as e:
            out["failing"]["error"] = str(e)
        dist.barrier()  # rank 0 removes the temporary folder after the agreement
        out["failing"]["left"] = sorted(p.name for p in (root / "failing").iterdir())
        saver.save(strategy(2), 2, {"step": 2})
        out["failing"]["then"] = str(saver.wait().path)
        saver.close()
    except Exception:  # noqa: BLE001 - the test shows it
        out["crash"] = traceback.format_exc()
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(out, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from fft_dist.dist import exit_rank

    exit_rank(main())
