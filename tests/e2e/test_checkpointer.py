"""The Checkpointer's phase API (issue 18): save -> wait -> close, the phases' order, the timings each
save returns, one save in flight at a time, its own process group, and the run's last/best checkpoints.

The synchronous runner is today's save; a deferred runner (write and commit run only when their
result is asked for) stands in for the background one of issue 21, so that the seam is tested now.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fft_dist import checkpoint as ckpt
from helpers import REPO, child_env, SUPPORT
from checkpointer_shared import PHASES


WORKER = str(SUPPORT / "checkpointer_worker.py")


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
