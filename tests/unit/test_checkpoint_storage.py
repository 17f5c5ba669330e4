"""Storage failures (read-only, full disk), failed saves clean up, atomic export, fault-point names.

Read-only and full file systems are real tmpfs mounts (chmod does not stop root); where mounting
is impossible the tests skip and say why. Every mount is unmounted in teardown.
"""
from __future__ import annotations

import pytest

from checkpoint_helpers import save
from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import ExportTargetError
from checkpoint_storage_shared import llama


# -- check_writable + failing saves (issue #8.14) -------------------------------------------------
def test_check_writable_creates_the_folder(tmp_path):
    ckpt.check_writable(tmp_path / "a" / "b" / "ckpts")
    assert (tmp_path / "a" / "b" / "ckpts").is_dir() and not list((tmp_path / "a" / "b" / "ckpts").iterdir())


# -- fault points (issue #7.4) ---------------------------------------------------------------------------
def test_unknown_fault_point_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FFT_DIST_FAULT_KILL_AT", "before_renmae")
    with pytest.raises(ValueError) as e:
        save(tmp_path / "ckpts", 1)
    assert "before_renmae" in str(e.value) and "before_rename" in str(e.value) and "mid_export" in str(e.value)
    assert not (tmp_path / "ckpts" / "step-0000001").exists()


def test_export_refuses_a_non_empty_folder_unless_overwrite(llama, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportTargetError, match="not empty"):
        ckpt.export_hf(llama, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    ckpt.export_hf(llama, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary sibling left
    (tmp_path / "empty").mkdir()
    ckpt.export_hf(llama.parent / "latest", tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors.index.json").is_file()
