"""Nothing lost, end to end (issue #15 items 1-5): real `fft-dist train` runs (2 gloo ranks) in folders
that already hold a user's files, an earlier run's outputs, or a corrupt checkpoint.

Only the CLI and the file system are used, so each case reads the same against any version.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from helpers import TINY_JOB, read_metrics, step_records, train

JOB = [*TINY_JOB, "train.max_steps=2", "checkpoint.save_final=true"]


def listing(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def outputs(run: Path) -> dict[str, bytes | None]:
    return {k: v for k, v in listing(run).items() if k.startswith(("hf/", "metrics.jsonl", "config.yaml"))}


def test_saves_keep_a_users_tmp_folder_and_a_new_run_keeps_the_earlier_runs_outputs(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    (root / "mydata.tmp").mkdir(parents=True)
    (root / "mydata.tmp" / "rows.jsonl").write_text("{}\n")

    # 1. the first save deleted every *.tmp folder in checkpoint.dir, the user's own included
    train(run, *JOB, "checkpoint.export_final=true")
    assert (root / "mydata.tmp" / "rows.jsonl").read_text() == "{}\n"

    # 3. its checkpoints moved away, a new run (resume=none) replaced the earlier run's hf/, metrics, config
    kept = tmp_path / "kept"
    kept.mkdir()
    for p in root.glob("step-000*"):
        shutil.move(str(p), kept / p.name)
    before = outputs(run)
    proc = train(run, *JOB, "train.lr=1e-4", expect_rc=2)
    assert "resume=auto" in proc.stderr and "checkpoint.overwrite=true" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "hf" in proc.stderr
    assert outputs(run) == before


def test_overwrite_deletes_checkpoints_only(tmp_path):
    """2. checkpoint.overwrite=true deleted step-plan.md and step-by-step/, and without it the refusal
    called them checkpoints of another run."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    train(run, *JOB)
    (root / "step-plan.md").write_text("plan")
    (root / "step-by-step").mkdir()
    (root / "step-by-step" / "notes.txt").write_text("notes")
    users = {k: v for k, v in listing(root).items() if k.startswith("step-by") or k.startswith("step-plan")}
    proc = train(run, *JOB, expect_rc=2)
    assert "step-0000002" in proc.stderr and "step-plan.md" not in proc.stderr and "step-by-step" not in proc.stderr
    train(run, *JOB, "checkpoint.overwrite=true", "train.lr=1e-4")
    assert {k: v for k, v in listing(root).items() if k in users} == users
    assert [r["step"] for r in step_records(run)] == [1, 2], "the earlier run's metrics were replaced on purpose"


def test_resume_falls_back_past_a_corrupt_newest_checkpoint_and_goes_on(tmp_path):
    """5. A flipped bit (same size) in the newest checkpoint: resume=auto used to exit 4 on every attempt."""
    run = tmp_path / "run"
    job = [*TINY_JOB, "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
    train(run, *job, "train.max_steps=4")
    first = {r["step"]: r["loss"] for r in step_records(run)}
    shard = run / "checkpoints" / "step-0000004" / "model" / "shard-00000-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    proc = train(run, *job, "train.max_steps=4", "resume=auto", "checkpoint.save_final=true")
    out = proc.stdout + proc.stderr
    assert "step-0000004 fails verification" in out and "sha256 mismatch" in out, out[-3000:]
    assert "resumed from" in out and "step-0000002" in out
    # steps 3 and 4 again, bit-identical to the first time (an exact resume from step 2)
    again = [r for r in read_metrics(run) if "loss" in r][-2:]
    assert [(r["step"], r["loss"]) for r in again] == [(3, first[3]), (4, first[4])]
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-0000002", "step-0000004", "step-0000004.damaged"]  # kept for a look, never deleted
