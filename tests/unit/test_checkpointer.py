"""The Checkpointer's phase API (issue 18): save -> wait -> close, the phases' order, the timings each
save returns, one save in flight at a time, its own process group, and the run's last/best checkpoints.

The synchronous runner is today's save; a deferred runner (write and commit run only when their
result is asked for) stands in for the background one of issue 21, so that the seam is tested now.
"""
from __future__ import annotations

from dataclasses import asdict
from checkpointer_worker import Deferred, recording

import pytest

from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import Checkpointer, SaveResult, writer
from checkpoint_helpers import RUN, strategy
from checkpointer_shared import PHASES


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
    # the caller waited for save 1 (counted as blocked: training stood still), then for the stage only
    assert closed.timings.waited > 0 and closed.timings.blocked - closed.timings.waited < closed.timings.total
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
