"""The Checkpointer's phase API (issue 18): save -> wait -> close, the phases' order, the timings each
save returns, one save in flight at a time, its own process group, and the run's last/best checkpoints.

The synchronous runner is today's save; a deferred runner (write and commit run only when their
result is asked for) stands in for the background one of issue 21, so that the seam is tested now.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import Checkpointer, SaveResult, writer
from checkpoint_helpers import RUN, strategy
from checkpointer_worker import Deferred, recording
from helpers import REPO, child_env, SUPPORT

WORKER = str(SUPPORT / "checkpointer_worker.py")
PHASES = ("stage", "setup", "write", "gather", "commit")


def test_save_returns_its_timings_and_wait_and_close_return_at_once(tmp_path):
    events: list[str] = []
    saver = recording(events)(tmp_path, run_id=RUN, keep_last=2)
    assert saver.group is None  # one process: no group to make
    result = saver.save(strategy(steps=1), 3, {"step": 3}, meta={"backend": "flatshard-rows"})
    assert isinstance(result, SaveResult) and result.step == 3 and result.path == tmp_path / "step-0000003"
    assert ckpt.verify_checkpoint(result.path) == []
    assert events == ["stage 3", "write 3", "commit 3"]
    t = asdict(result.timings)
    assert all(t[k] >= 0 for k in t)
    assert sum(t[k] for k in PHASES) == pytest.approx(t["total"], abs=0.05)
    assert t["blocked"] >= t["total"]  # synchronous: the caller waited for the whole save
    assert saver.wait() is result and (saver.last, saver.last_step, saver.newest_step) == (result.path, 3, 3)
    assert saver.close() is result and saver.close() is result and saver.closed
    with pytest.raises(RuntimeError, match="closed"):
        saver.save(strategy(steps=1), 4, {"step": 4})
    assert not hasattr(writer, "LAST_SAVE_TIMINGS")  # timings are values now, not a module global


def test_a_second_save_waits_for_the_one_in_flight_and_close_waits(tmp_path):
    events: list[str] = []
    saver = recording(events)(tmp_path, run_id=RUN, keep_last=5, runner=Deferred)
    assert saver.save(strategy(steps=1), 1, {"step": 1}) is None  # staged only: nothing on disk yet
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and saver.last is None and saver.newest_step == 1
    events.append("ask 2")
    assert saver.save(strategy(steps=2), 2, {"step": 2}) is None
    assert (tmp_path / "step-0000001").is_dir() and not (tmp_path / "step-0000002").exists()
    assert saver.last_step == 1
    events.append("close")
    closed = saver.close()
    assert events == ["stage 1", "ask 2", "write 1", "commit 1", "stage 2", "close", "write 2", "commit 2"]
    assert closed.step == 2 and saver.last_step == 2 and ckpt.verify_checkpoint(closed.path) == []
    assert closed.timings.blocked < closed.timings.total  # the caller waited for the stage only
    assert saver.close() is closed and saver.wait() is closed


def test_a_failed_save_in_flight_raises_at_wait_and_leaves_no_temporary(tmp_path):
    saver = Checkpointer(tmp_path, run_id=RUN, keep_last=2, runner=Deferred)
    bad = strategy(steps=1)
    next(iter(bad.params.values())).data.view(-1)[0] = float("nan")
    assert saver.save(bad, 1, {"step": 1}) is None
    with pytest.raises(ckpt.CheckpointError, match="holds NaN/inf"):
        saver.wait()
    assert list(tmp_path.iterdir()) == [] and saver.last is None
    saver.save(strategy(steps=1), 1, {"step": 1})  # the checkpointer goes on
    assert saver.close().path == tmp_path / "step-0000001"


def test_the_checkpointer_keeps_the_best_checkpoint_and_the_saved_state_names_it(tmp_path):
    saver = Checkpointer(tmp_path, run_id=RUN, keep_last=1, keep_best=True)
    seen = []

    def state(best):
        seen.append(best)
        return {"best": best}

    saver.save(strategy(steps=1), 1, state)
    saver.save(strategy(steps=2), 2, state, best=True)
    saver.save(strategy(steps=3), 3, state)
    saver.save(strategy(steps=4), 4, state)
    assert seen == [None, "step-0000002", "step-0000002", "step-0000002"]
    assert saver.best == "step-0000002" and saver.last == tmp_path / "step-0000004"
    # keep_last=1 prunes steps 1 and 3; the best one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000002", "step-0000004"]
    assert ckpt.read_train_state(tmp_path / "step-0000004")["train_state"] == {"best": "step-0000002"}


def test_phase_api_on_two_gloo_ranks_with_its_own_group(tmp_path):
    """Real 2-rank gloo processes: every save collective runs on the Checkpointer's own gloo group, the
    phases run in order (synchronous and deferred), a failure in flight raises the same error on both
    ranks at wait(), and a deferred save writes the same bytes as the one-off save_checkpoint."""
    root, out = tmp_path / "root", tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "--monitor_interval", "0.2", WORKER, "--root", str(root), "--out", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert "crash" not in r, r["crash"]
        assert r["own_group_backend"] == "gloo" and not r["own_group_is_world"]
        assert r["groups_all_own"] and r["group_calls"] >= 6  # each save: setup, write, gather, commit
        sync = r["sync"]
        assert sync["events"] == ["stage 2", "write 2", "commit 2", "stage 4", "write 4", "commit 4"]
        assert sync["seen_best"] == ["step-0000002", "step-0000002"] and sync["best"] == "step-0000002"
        assert sync["wait_is_r4"] and sync["close"] == [True, True, True] and "closed" in sync["after_close"]
        for t in sync["timings"]:
            assert sum(t[k] for k in PHASES) == pytest.approx(t["total"], abs=0.05) and t["blocked"] >= t["total"]
        d = r["deferred"]
        assert d["first_returned"] is None and not d["committed_after_save"]
        assert d["step2_after_second_save"] and not d["step4_before_close"]
        assert (d["newest_step"], d["last_before_close"], d["last"]) == (4, 2, 4)
        assert d["events"] == ["stage 2", "ask 4", "write 2", "commit 2", "stage 4", "close", "write 4", "commit 4",
                               "close again"]
        assert d["again_same"] and d["blocked"] < d["total"]
        f = r["failing"]
        assert f["save_returned"] is None and f["left"] == [] and f["then"].endswith("step-0000002")
        assert "rank 1: model.a.weight (param) holds NaN/inf" in f["error"]
    assert res[0]["failing"]["error"] == res[1]["failing"]["error"]
    # keep_best kept step 2 under keep_last=1
    assert sorted(p.name for p in (root / "sync").iterdir()) == ["latest", "step-0000002", "step-0000004"]
    for name in ("sync/step-0000002", "sync/step-0000004", "deferred/step-0000004", "oneoff/step-0000004"):
        assert ckpt.verify_checkpoint(root / name) == []
    # the same state saved by the deferred Checkpointer and by the one-off save: the same bytes
    a, b = root / "deferred/step-0000004", root / "oneoff/step-0000004"
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for f in files:
        if f not in ("train_state.json", "MANIFEST.json"):  # those two hold the creation time
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    sa, sb = (json.loads((x / "train_state.json").read_text()) for x in (a, b))
    assert {**sa, "created": None} == {**sb, "created": None}
