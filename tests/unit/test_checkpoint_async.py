"""Asynchronous saves (issue 21), in one process: the staged copy, the reused buffer, the background writer's
priority, one save in flight at a time, and the checkpoint.async_save=auto rule. The multi-rank cases (kill -9
in each phase, a stop signal during a save, exact resume) are in tests/e2e."""
from __future__ import annotations

import os
import time

import pytest
import torch

from checkpoint_helpers import RUN, strategy
from checkpoint_worker import FlatShardStrategy
from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointReader, Checkpointer
from fft_dist.checkpoint.background import NICE_INCREMENT, BackgroundWriter
from fft_dist.checkpoint.faults import FAULT_POINTS
from fft_dist.checkpoint.stage import projected_staging_bytes, staged_bytes
from fft_dist.config import AsyncSave
from fft_dist.run_checkpoints import AUTO_ASYNC_SHARE, decide_async, mem_available, save_warnings

GIB = 1 << 30


def test_the_save_copies_what_it_saves_and_training_may_change_everything_at_once(tmp_path):
    s = strategy(steps=1)
    saver = Checkpointer(tmp_path, run_id=RUN, keep_last=5, async_save=True)
    before = {n: p.detach().clone() for n, p in s.params.items()}
    state = {"step": 1, "nested": {"tokens": 10}}
    saver.save(s, 1, state)  # returns once staged (the result, if the writer was already done)
    for p in s.params.values():  # what training does next, while the writer may still be writing
        p.data.add_(1.0)
    state["nested"]["tokens"] = 999
    result = saver.close()
    assert result.step == 1 and ckpt.verify_checkpoint(result.path) == []
    reader = CheckpointReader(result.path)
    for name, value in before.items():
        assert torch.equal(reader.read_full(name).reshape(-1), value.reshape(-1)), name
    assert ckpt.read_train_state(result.path)["train_state"]["nested"]["tokens"] == 10
    t = result.timings
    assert t.blocked < t.total and t.written > 0 and t.waited < 0.05  # nothing was in flight before it


def test_the_staging_buffer_is_allocated_once_and_the_writer_runs_at_a_lower_priority(tmp_path):
    s = strategy(steps=1)
    saver = Checkpointer(tmp_path, run_id=RUN, keep_last=5, async_save=True)
    saver.save(s, 1, {"step": 1})
    saver.wait()
    buffers = dict(saver._buffer._tensors)  # noqa: SLF001 - the reuse is the point under test
    nbytes = saver.staging_bytes
    assert nbytes == staged_bytes(s) > 0
    s.train_step(1)
    saver.save(s, 2, {"step": 2})
    writer = saver._runner  # noqa: SLF001
    assert isinstance(writer, BackgroundWriter) and writer._thread.daemon  # noqa: SLF001 - dies with its rank
    tid = writer._thread.native_id  # noqa: SLF001
    # SCHED_IDLE where Linux allows it (a core only when no other thread wants one), else a higher nice value
    assert os.sched_getscheduler(tid) == os.SCHED_IDLE or \
        os.getpriority(os.PRIO_PROCESS, tid) >= min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE_INCREMENT)
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the training thread keeps its own
    saver.close()
    assert saver.staging_bytes == nbytes
    assert all(saver._buffer._tensors[k] is t for k, t in buffers.items())  # noqa: SLF001
    assert [p.name for p in sorted(tmp_path.glob("step-*"))] == ["step-0000001", "step-0000002"]


def test_a_second_save_waits_for_the_one_in_flight(tmp_path, monkeypatch):
    """The write of step 1 pauses 0.6 s (a fault point's delay): asking for step 2 blocks until it is committed."""
    monkeypatch.setenv("FFT_DIST_FAULT_KILL_AT", "after_model_shards")
    monkeypatch.setenv("FFT_DIST_FAULT_KILL_STEP", "1")
    monkeypatch.setenv("FFT_DIST_FAULT_DELAY_S", "0.6")
    s = strategy(steps=1)
    saver = Checkpointer(tmp_path, run_id=RUN, keep_last=5, async_save=True)
    t0 = time.perf_counter()
    assert saver.save(s, 1, {"step": 1}) is None  # staged only: training goes on
    assert time.perf_counter() - t0 < 0.5 and saver.last is None
    assert saver.poll() is None
    saver.save(s, 2, {"step": 2})
    assert saver.last_step == 1 and ckpt.verify_checkpoint(tmp_path / "step-0000001") == []
    second = saver.close()
    assert second.step == 2 and second.timings.waited >= 0.3 and second.timings.blocked >= second.timings.waited


def test_a_failed_background_save_is_raised_where_every_rank_waits_not_at_poll(tmp_path):
    s = strategy(steps=1)
    next(iter(s.params.values())).data.view(-1)[0] = float("nan")
    saver = Checkpointer(tmp_path, run_id=RUN, keep_last=2, async_save=True)
    saver.save(s, 1, {"step": 1})
    deadline = time.time() + 10
    while not saver._pending.done() and time.time() < deadline:  # noqa: SLF001
        time.sleep(0.01)
    assert saver.poll() is None  # rank-local: a failure must surface at a collective point
    with pytest.raises(ckpt.CheckpointError, match="holds NaN/inf"):
        saver.wait()
    assert list(tmp_path.iterdir()) == []
    saver.close()


def test_every_phase_has_a_fault_point():
    assert {"mid_stage", "mid_model_shard", "before_rename"} <= set(FAULT_POINTS)


@pytest.mark.parametrize("hosts,expected", [
    ([("a", 1 * GIB, 8 * GIB), ("a", 1 * GIB, 8 * GIB)], True),
    ([("a", 3 * GIB, 8 * GIB), ("a", 3 * GIB, 8 * GIB)], False),  # two ranks on one host: 6 of 8 GiB
    ([("a", 3 * GIB, 8 * GIB), ("b", 3 * GIB, 8 * GIB)], True),   # one rank per host
    ([("a", 1, None)], False),                                      # the available memory is unknown
])
def test_auto_compares_each_hosts_staging_buffers_with_its_available_memory(hosts, expected):
    on, why = decide_async(AsyncSave.auto, hosts)
    assert on is expected and "GiB" in why or "unknown" in why
    assert f"{AUTO_ASYNC_SHARE:.0%}" in why or "unknown" in why


def test_on_and_off_are_taken_as_given():
    assert decide_async(AsyncSave.on, [("a", 10 * GIB, 1)]) == (True, "checkpoint.async_save=on")
    assert decide_async(AsyncSave.off, [("a", 1, 10 * GIB)]) == (False, "checkpoint.async_save=off")
    assert mem_available() is None or mem_available() > 0


def test_auto_counts_the_buffer_before_the_optimizer_has_made_its_states():
    """checkpoint.async_save=auto decides before training, when a fresh torch optimizer has no states yet:
    the projection (weights + 8 bytes of AdamW state per trainable element) is what the buffer will hold
    at the first save, short only of AdamW's scalar step counters; frozen parameters get no states."""
    fresh, trained = strategy(steps=0), strategy(steps=1)
    assert {f.kind for f in fresh.fragments()} == {"param"}
    counters = 4 * len(trained.params)  # one fp32 'step' per tensor, not per element
    assert projected_staging_bytes(fresh, state_bytes_per_param=8, frozen=()) == staged_bytes(trained) - counters
    assert projected_staging_bytes(trained, state_bytes_per_param=8, frozen=()) == staged_bytes(trained)  # exact
    name = next(iter(fresh.params))
    frozen = FlatShardStrategy(fresh.shapes, split="rows", rank=0, world=1, frozen=(name,))
    assert projected_staging_bytes(frozen, state_bytes_per_param=8, frozen=(name,)) == \
        staged_bytes(trained) - counters - 8 * fresh.params[name].numel()


def _timings(*, blocked: float, written: float, waited: float = 0.0) -> ckpt.SaveTimings:
    return ckpt.SaveTimings(stage=blocked - waited, setup=0.0, write=written, gather=0.0, commit=0.0,
                            total=blocked + written, blocked=blocked, waited=waited)


def test_a_save_too_slow_for_the_signal_lead_or_the_save_interval_is_warned():
    """A stop during a save costs two saves, so twice (block + write) must fit in launcher.signal_lead_s; a save
    that made the next one wait names checkpoint.every_steps. A launcher without a lead (0) is never warned."""
    quick = _timings(blocked=0.2, written=20.0)
    assert save_warnings(quick, step=4, signal_lead_s=120, every_steps=2) == []
    assert save_warnings(_timings(blocked=0.2, written=80.0), step=4, signal_lead_s=0, every_steps=2) == []
    [(kind, message)] = save_warnings(_timings(blocked=0.2, written=70.0), step=4, signal_lead_s=120, every_steps=2)
    assert kind == "lead" and "a save takes 70 s" in message
    assert "140 s, more than launcher.signal_lead_s=120" in message
    [(kind, message)] = save_warnings(_timings(blocked=3.0, written=20.0, waited=2.5), step=6, signal_lead_s=120,
                                      every_steps=2)
    assert kind == "every" and "save of step 6" in message and "checkpoint.every_steps=2" in message
    assert "waited 2.5 s" in message
