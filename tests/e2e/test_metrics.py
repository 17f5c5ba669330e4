"""Experiment tracking: the W&B run (offline, no network) holds the resolved config and every
metrics record at its step; settings that cannot work are refused before launch."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from helpers import TINY_JOB, child_env, eval_losses, fft_dist, read_metrics


_BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed chunks


_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every protobuf Record in a run's .wandb file (offline runs keep history only there)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # a block's tail too short for a header is zero padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad checksum at byte {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.mark.slow
def test_wandb_offline_run_has_config_and_history(tmp_path):
    run = tmp_path / "run"
    home = tmp_path / "wandb_home"  # keep wandb's settings and caches out of the user's home
    env = child_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "unused"), WANDB_CONFIG_DIR=str(home),
                    WANDB_CACHE_DIR=str(home), WANDB_DATA_DIR=str(home))
    proc = fft_dist("train", f"run.dir={run}", "parallelism=fsdp", "launcher.nproc_per_node=2", *TINY_JOB,
                    "train.max_steps=4", "eval.every_steps=2", "logging.wandb.enabled=true",
                    "logging.wandb.project=fft-dist-test", "logging.wandb.run_name=tiny",
                    "logging.wandb.tags=[ci,tiny]", env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one W&B run (rank 0 only), found {runs}"
    (log,) = runs[0].glob("run-*.wandb")
    records = wandb_records(log)

    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (meta.project, meta.display_name, list(meta.tags)) == ("fft-dist-test", "tiny", ["ci", "tiny"])
    config = {_key(u): json.loads(u.value_json) for u in meta.config.update}
    assert config["train"]["max_steps"] == 4 and config["model"]["name"] == "test_tiny", config
    assert config["run"]["dir"] == str(run) and config["logging"]["wandb"]["enabled"] is True

    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.setdefault(r.history.step.num, {}).update(
                {_key(i): json.loads(i.value_json) for i in r.history.item})
    expected = {rec["step"]: rec for rec in read_metrics(run) if "loss" in rec}
    assert sorted(s for s in rows if "train/loss" in rows[s]) == sorted(expected) == [1, 2, 3, 4]
    for step, rec in expected.items():
        assert rows[step]["train/loss"] == pytest.approx(rec["loss"], rel=1e-12)
        assert rows[step]["train/lr"] == pytest.approx(rec["lr"], rel=1e-12)
        assert "train/mfu" not in rows[step], "a null MFU must not be logged as a number"
    evals = eval_losses(run)
    assert [s for s in sorted(rows) if "eval/loss" in rows[s]] == [s for s, _ in evals] == [0, 2, 4]
    assert [rows[s]["eval/loss"] for s, _ in evals] == pytest.approx([loss for _, loss in evals], rel=1e-12)
    assert list((run / "tb").glob("events.out.tfevents.*")), "TensorBoard must still be written"
