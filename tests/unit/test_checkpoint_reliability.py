"""Damaged checkpoints, hostile paths, corrupt metadata, non-finite values, keep_last protection.

Single-process checkpoints of the test strategy (tests/support/checkpoint_worker.py) keep these fast;
the collective paths are covered with 2 real ranks where a rank-local problem matters.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import SHAPES, edit_json, rewrite, save, strategy, truncate

from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointError

SHARD = "model/shard-00000-of-00001.safetensors"


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# -- resume=auto and pruning with damaged checkpoints (issue #8.4) ----------------------------------
def test_auto_resume_skips_damaged_newest_warns_and_prune_keeps_intact(tmp_path, capsys):
    root = tmp_path / "ckpts"
    for step in (1, 2, 3):
        save(root, step, keep_last=3)
    truncate(root / "step-0000003" / SHARD)
    assert ckpt.find_resume("auto", root) == root / "step-0000002"
    err = capsys.readouterr().err
    assert "warning" in err and "step-0000003" in err and "truncated" in err and "resuming from step-0000002" in err
    # the run goes on from step 2 and saves step 4 with keep_last=2: the 2 newest *intact* are kept,
    # the damaged step 3 is neither counted nor touched
    save(root, 4, keep_last=2)
    assert names(root) == ["latest", "step-0000002", "step-0000003", "step-0000004"]
    assert ckpt.verify_checkpoint(root / "step-0000002") == []
    save(root, 5, keep_last=2)
    assert names(root) == ["latest", "step-0000003", "step-0000004", "step-0000005"]


def test_auto_resume_refuses_when_every_checkpoint_is_damaged(tmp_path):
    root = tmp_path / "ckpts"
    for step in (1, 2):
        save(root, step)
    truncate(root / "step-0000002" / SHARD)
    (root / "step-0000001" / "MANIFEST.json").unlink()
    before = names(root)
    with pytest.raises(CheckpointError) as e:
        ckpt.find_resume("auto", root)
    msg = str(e.value)
    assert "none is intact" in msg and "step-0000001" in msg and "step-0000002" in msg and "truncated" in msg
    with pytest.raises(CheckpointError, match="none is intact"):
        ckpt.find_resume(str(root), tmp_path)  # a root given as the path: the same rule
    assert names(root) == before  # nothing deleted
    # no checkpoint at all is still "start fresh": a missing root, an empty one, only a killed save's .tmp
    assert ckpt.find_resume("auto", tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert ckpt.find_resume("auto", tmp_path / "empty") is None
    (tmp_path / "killed" / "step-0000001.tmp").mkdir(parents=True)
    assert ckpt.find_resume("auto", tmp_path / "killed") is None


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage\x80", b"../step-0000001\n", b"/etc\n", b""])
def test_garbage_latest_falls_back_with_warning(tmp_path, capsys, content):
    root = tmp_path / "ckpts"
    save(root, 1)
    save(root, 2)
    (root / "latest").write_bytes(content)
    assert ckpt.find_resume("auto", root) == root / "step-0000002"
    assert "latest" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="latest"):  # named explicitly, it must be valid
        ckpt.resolve_checkpoint(root / "latest")
    assert ckpt.verify_checkpoint(root / "latest") and "latest" in ckpt.verify_checkpoint(root / "latest")[0]


def test_keep_last_spares_protected_checkpoints(tmp_path):
    root = tmp_path / "ckpts"
    for step in (1, 2, 3, 4):
        save(root, step, keep_last=1, protect={"step-0000002"})
    assert names(root) == ["latest", "step-0000002", "step-0000004"]
    save(root, 5, keep_last=2)  # no longer protected: pruned like any other
    assert names(root) == ["latest", "step-0000004", "step-0000005"]


# -- `latest` accepted wherever a checkpoint path is (issue #8.12) ------------------------------------
def test_latest_file_and_root_resolve_everywhere(tmp_path):
    root = tmp_path / "ckpts"
    save(root, 1)
    s = strategy(steps=3)
    target = save(root, 2, s=s)
    for path in (root / "latest", root, target):
        assert ckpt.resolve_checkpoint(path) == target
        assert ckpt.verify_checkpoint(path) == []
        assert ckpt.checkpoint_info(path)["step"] == 2
        assert ckpt.read_train_state(path)["step"] == 2
    assert ckpt.find_resume(str(root / "latest"), tmp_path) == target
    fresh = strategy(steps=0, seed=5)
    assert ckpt.load_checkpoint(fresh, root / "latest") == {"step": 2}
    for name, p in fresh.params.items():
        assert torch.equal(p, s.params[name])
    (root / "latest").write_text("step-0000009\n")
    with pytest.raises(CheckpointError, match="step-0000009, which does not exist"):
        ckpt.resolve_checkpoint(root / "latest")


# -- non-finite values are never saved (issue #8.7) -------------------------------------------------------
@pytest.mark.parametrize("kind", ["param", "exp_avg_sq"])
def test_nonfinite_fragment_refuses_the_save(tmp_path, kind):
    root = tmp_path / "ckpts"
    good = save(root, 1)
    s = strategy(steps=2)
    p = s.params["model.c.weight"]
    target = p if kind == "param" else s.optimizer.state[p]["exp_avg_sq"]
    target.data.view(-1)[4] = float("nan") if kind == "param" else float("inf")
    with pytest.raises(CheckpointError) as e:
        save(root, 2, s=s)
    msg = str(e.value)
    assert f"model.c.weight ({kind}) holds NaN/inf (first at flat element 4)" in msg and "nothing was committed" in msg
    assert names(root) == ["latest", "step-0000001"]  # no step-0000002, no step-0000002.tmp
    assert ckpt.find_resume("auto", root) == good


# -- paths stay inside the checkpoint (issue #8.9) ---------------------------------------------------------
def _all_readers_refuse(folder: Path, *needles: str) -> None:
    problems = ckpt.verify_checkpoint(folder)
    assert problems and all(n in problems[0] for n in needles), problems
    for call in (lambda: ckpt.checkpoint_info(folder), lambda: ckpt.find_resume(str(folder), folder.parent),
                 lambda: ckpt.load_checkpoint(strategy(steps=0), folder),
                 lambda: ckpt.export_hf(folder, folder.parent / "hf-out")):
        with pytest.raises(CheckpointError) as e:
            call()
        assert all(n in str(e.value) for n in needles), str(e.value)
    assert not (folder.parent / "hf-out").exists()


@pytest.mark.parametrize("bad", ["../../x", "/etc/passwd", "model/../../x", "model//x"])
def test_manifest_path_outside_the_checkpoint_is_refused(tmp_path, bad):
    folder = save(tmp_path / "ckpts", 1)
    edit_json(folder, "MANIFEST.json", lambda m: m["files"].update({bad: {"size": 4, "sha256": "0" * 64}}),
              fix_manifest=False)
    _all_readers_refuse(folder, repr(bad), "leaves the checkpoint folder")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/tmp/x.safetensors"])
def test_index_shard_path_outside_the_checkpoint_is_refused(tmp_path, bad):
    folder = save(tmp_path / "ckpts", 1)
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / SHARD, outside)

    def point_outside(index):
        index["tensors"]["model.a.weight"]["kinds"]["param"]["ranges"][0][2] = bad

    edit_json(folder, "index.json", point_outside)  # manifest updated: only the path rule can catch it
    _all_readers_refuse(folder, "model.a.weight (param)", repr(bad))


def test_index_shard_not_in_manifest_is_refused(tmp_path):
    folder = save(tmp_path / "ckpts", 1)
    shutil.copy(folder / SHARD, folder / "model" / "extra.safetensors")

    def elsewhere(index):
        index["tensors"]["model.b.weight"]["kinds"]["param"]["ranges"][0][2] = "model/extra.safetensors"

    edit_json(folder, "index.json", elsewhere)
    _all_readers_refuse(folder, "'model/extra.safetensors' is not listed in MANIFEST.json")


# -- corrupt metadata: a named CheckpointError, never a traceback (issue #8.11) ----------------------------
def test_one_bit_flip_in_manifest_field_name(tmp_path, capsys):
    root = tmp_path / "ckpts"
    save(root, 1)
    folder = save(root, 2)
    mpath = folder / "MANIFEST.json"
    text = mpath.read_text()
    assert '"size"' in text
    mpath.write_text(text.replace('"size"', '"sizd"', 1))
    _all_readers_refuse(folder, "MANIFEST.json", "'size'")
    assert ckpt.find_resume("auto", root) == root / "step-0000001"  # the damaged newest is skipped, loudly
    assert "damaged checkpoint step-0000002" in capsys.readouterr().err


@pytest.mark.parametrize("index", [
    "not json at all {",
    '{"format": "fft-dist-checkpoint", "tensors": []}',
    '{"format": "fft-dist-checkpoint", "tensors": {"model.a.weight": {"shape": [13, 8], "dtype": "float32", '
    '"kinds": {"param": {"shape": [13, 8], "dtype": "float32", "ranges": {"0": 1}}}}}}',
    '{"format": "fft-dist-checkpoint", "tensors": {"model.a.weight": {"shape": "13x8", "dtype": "float32", '
    '"kinds": {}}}}',
])
def test_malformed_index(tmp_path, index):
    folder = save(tmp_path / "ckpts", 1)
    rewrite(folder, "index.json", index)
    _all_readers_refuse(folder, "index.json")


@pytest.mark.parametrize("mutate", [
    lambda st: st.update(train_state=[1, 2]),
    lambda st: st.update(rng="x"),
    lambda st: st.update(step="1"),
    lambda st: st["rng"][0].update(torch="AAAA"),
    lambda st: st["rng"][0]["numpy"].pop("key"),
])
def test_train_state_of_the_wrong_shape(tmp_path, mutate):
    folder = save(tmp_path / "ckpts", 1)
    edit_json(folder, "train_state.json", mutate)
    fresh = strategy(steps=0, seed=3)
    before = {n: p.detach().clone() for n, p in fresh.params.items()}
    with pytest.raises(CheckpointError, match="train_state.json"):
        ckpt.load_checkpoint(fresh, folder)
    assert all(torch.equal(p, before[n]) for n, p in fresh.params.items())  # refused before loading
    [problem] = ckpt.verify_checkpoint(folder)
    assert "train_state.json" in problem
    with pytest.raises(CheckpointError, match="train_state.json"):
        ckpt.find_resume(str(folder), folder.parent)


# -- a pretrained HF folder with garbage in it (issue #8.11) -------------------------------------------------
@pytest.fixture
def hf_folder(tmp_path) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({n: torch.zeros(s) for n, s in SHAPES.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ckpt.load_pretrained(strategy(steps=0), folder)  # loads while intact
    return folder


@pytest.mark.parametrize("target,content", [
    ("config.json", b"{ this is not json"),
    ("config.json", b"[1, 2]"),
    ("model.safetensors", b"\x00" * 7),
    ("model.safetensors", b"\xff" * 64),
    ("model.safetensors.index.json", b'{"weight_map": {"model.a.weight": "../outside.safetensors"}}'),
    ("model.safetensors.index.json", b'{"weight_map": ["model.safetensors"]}'),
])
def test_garbage_in_model_path_is_a_named_error(hf_folder, target, content):
    shutil.copy(hf_folder / "model.safetensors", hf_folder.parent / "outside.safetensors")  # a readable escape
    (hf_folder / target).write_bytes(content)
    s = strategy(steps=0, seed=9)
    before = {n: p.detach().clone() for n, p in s.params.items()}
    with pytest.raises(CheckpointError, match=target.replace(".", r"\.")):
        ckpt.load_pretrained(s, hf_folder)
    assert all(torch.equal(p, before[n]) for n, p in s.params.items())
