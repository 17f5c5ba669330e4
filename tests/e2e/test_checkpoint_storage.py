"""Storage failures (read-only, full disk), failed saves clean up, atomic export, fault-point names.

Read-only and full file systems are real tmpfs mounts (chmod does not stop root); where mounting
is impossible the tests skip and say why. Every mount is unmounted in teardown.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_helpers import RUN, save, strategy
from helpers import SUPPORT
from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointError
from checkpoint_storage_shared import llama


WORKER = str(SUPPORT / "checkpoint_worker.py")


def _mount(target: Path, options: str) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root/CAP_SYS_ADMIN")
    return target


@pytest.fixture
def mounts():
    done: list[Path] = []

    def mount(target: Path, options: str) -> Path:
        done.append(_mount(target, options))
        return target

    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_read_only_checkpoint_dir(tmp_path, mounts):
    ro = mounts(tmp_path / "ro", "ro,size=1m")
    for root in (ro, ro / "run" / "checkpoints"):
        with pytest.raises(CheckpointError) as e:
            ckpt.check_writable(root)
        assert str(root) in str(e.value) and "Read-only file system" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        save(ro / "ckpts", 1)
    assert "Read-only file system" in str(e.value) and str(ro / "ckpts") in str(e.value)


def test_full_disk_names_the_file_and_removes_the_partial_save(tmp_path, mounts):
    root = mounts(tmp_path / "small", "size=256k")
    ckpt.check_writable(root)  # the probe fits
    big = strategy({"model.big.weight": (256, 256)}, steps=1)  # 256 KiB of parameters + 512 KiB of Adam state
    with pytest.raises(CheckpointError) as e:
        save(root, 1, s=big)
    msg = str(e.value)
    assert "No space left on device" in msg and str(root / f"step-0000001.{RUN}.tmp") in msg, msg
    assert sorted(p.name for p in root.iterdir()) == []  # no step-0000001.tmp, no latest
    # a save that fits, then a full disk at the next one: the previous checkpoint stays the latest
    small = save(root, 1, s=strategy({"model.small.weight": (8, 8)}))
    with pytest.raises(CheckpointError, match="No space left on device"):
        save(root, 2, s=strategy({"model.small.weight": (8, 8), "model.big.weight": (256, 256)}))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
    assert ckpt.find_resume("auto", root) == small and ckpt.verify_checkpoint(small) == []


def test_nonfinite_on_one_rank_refuses_on_every_rank(tmp_path):
    """2 real ranks; every rank's first parameter gets a NaN before the step-2 save: both ranks raise
    the same error, step 1 stays the newest and nothing of step 2 remains."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"tensors": [["model.a.weight", [13, 8]], ["model.b.weight", [7]]]}))
    root, out = tmp_path / "ckpts", tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "--monitor_interval", "0.2", WORKER, "--spec", str(spec), "--ckpt-root", str(root), "--split", "flat",
           "--steps", "2", "--save-every", "1", "--nan-at", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    errors = [json.loads(Path(f"{out}.rank{r}.json").read_text())["error"] for r in range(2)]
    assert errors[0] == errors[1] and "model.a.weight (param) holds NaN/inf" in errors[0], errors
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]


def test_failed_export_leaves_the_previous_folder_untouched(llama, tmp_path, monkeypatch):
    from fft_dist.checkpoint import export as export_mod

    out = tmp_path / "hf"
    ckpt.export_hf(llama, out, max_shard_size="4KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(*args, **kwargs):
        if calls:
            raise OSError(28, "No space left on device")
        calls.append(1)
        return real(*args, **kwargs)

    real = export_mod.write_safetensors_lazy
    monkeypatch.setattr(export_mod, "write_safetensors_lazy", failing)
    with pytest.raises(OSError, match="No space left"):
        ckpt.export_hf(llama, out, max_shard_size="4KB", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    # killed mid-export (SIGKILL after the first shard): the old folder is still whole
    env = dict(os.environ, FFT_DIST_FAULT_KILL_AT="mid_export", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fft_dist.cli", "export", str(llama), str(out), "--force",
                           "--max-shard-size", "4KB"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "hf"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".hf.partial"), leftovers  # what the kill left
    monkeypatch.undo()
    ckpt.export_hf(llama, out, max_shard_size="4KB", overwrite=True)  # the next export into hf removes it
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
