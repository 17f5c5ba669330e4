"""The checkpoint format: save / resume / reshard / crash safety / bad checkpoints / export / HF load.

Multi-rank cases run real processes over gloo through ``python -m torch.distributed.run`` with
the sharded test strategy of tests/support/checkpoint_worker.py (FSDP-like row shards,
ZeRO-3-like flat pieces, ZeRO-2-like group partitions that straddle tensors, uneven splits).
Its AdamW updates are element-wise, so any resumed run must be *bit-identical* to an
uninterrupted single-process reference, whatever the world size or split.
"""
from __future__ import annotations

import json
from pathlib import Path
from checkpoint_worker import FlatShardStrategy

import pytest
import torch

from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointError
from checkpoint_helpers import RUN
from checkpoint_shared import LLAMA, reference, shapes_of, spec


# -- bad checkpoints --------------------------------------------------------------------------------------
@pytest.fixture()
def good(spec, tmp_path) -> Path:
    s = reference(spec, 2)
    return ckpt.save_checkpoint(s, ckpt_root=tmp_path / "root", step=2, train_state={"step": 2}, keep_last=2,
                                meta={"backend": "flatshard-rows"}, run_id=RUN)


def fresh_untouched(spec) -> tuple[FlatShardStrategy, dict]:
    s = FlatShardStrategy(shapes_of(spec), split="flat", rank=0, world=1, seed=7)
    return s, {n: p.detach().clone() for n, p in s.params.items()}


def expect_load_error(spec, path: Path, *needles: str) -> str:
    s, before = fresh_untouched(spec)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(s, path)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    for n, p in s.params.items():  # nothing was partly loaded
        assert torch.equal(p, before[n])
    assert not s.optimizer.state
    return msg


def test_truncated_shard(spec, good):
    shard = good / "optim/shard-00000-of-00001.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    expect_load_error(spec, good, "optim/shard-00000-of-00001.safetensors", "truncated")
    assert any("truncated" in p for p in ckpt.verify_checkpoint(good))
    with pytest.raises(CheckpointError, match="none is intact"):  # never picked, never silently step 0
        ckpt.find_resume("auto", good.parent)


def test_flipped_byte_is_caught_by_checksum(spec, good):
    shard = good / "model/shard-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    expect_load_error(spec, good, "model/shard-00000-of-00001.safetensors", "sha256")
    [problem] = ckpt.verify_checkpoint(good)
    assert "sha256" in problem


def test_missing_index(spec, good):
    (good / "index.json").unlink()
    expect_load_error(spec, good, "index.json", "missing")


def test_missing_manifest_means_incomplete(spec, good):
    (good / "MANIFEST.json").unlink()
    expect_load_error(spec, good, "MANIFEST.json", "incomplete")
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.find_resume(str(good), good.parent)
    with pytest.raises(CheckpointError, match="none is intact"):
        ckpt.find_resume("auto", good.parent)


def test_shape_mismatch_lists_names_and_shapes(spec, good):
    shapes = shapes_of(spec)
    shapes["model.embed_tokens.weight"] = (98, 24)
    shapes["lm_head.weight"] = (98, 24)
    del shapes["model.norm.weight"]
    shapes["model.extra.weight"] = (3, 3)
    s = FlatShardStrategy(shapes, split="rows", rank=0, world=1, seed=3)
    before = {n: p.detach().clone() for n, p in s.params.items()}
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(s, good)
    msg = str(e.value)
    assert "model.embed_tokens.weight: checkpoint step-0000002 has shape [97, 24], the model has [98, 24]" in msg
    assert "lm_head.weight" in msg and "model.extra.weight: missing" in msg
    assert "model.norm.weight: in checkpoint" in msg and "nothing was loaded" in msg
    assert all(torch.equal(p, before[n]) for n, p in s.params.items())


def test_resume_paths(good, tmp_path):
    root = good.parent
    assert ckpt.find_resume("none", root) is None
    assert ckpt.find_resume("auto", tmp_path / "nothing-here") is None
    with pytest.raises(CheckpointError, match="does-not-exist.*does not exist"):
        ckpt.find_resume(str(tmp_path / "does-not-exist"), root)
    assert ckpt.find_resume(str(good), root) == good
    assert ckpt.find_resume(str(root), tmp_path) == good  # a checkpoint root resolves to its newest
    # `latest` naming a folder that is gone: fall back to scanning for complete step-N folders
    (root / "latest").write_text("step-0000099\n")
    assert ckpt.find_resume("auto", root) == good


def test_cli_verify_and_info(good, capsys):
    from fft_dist.cli import main

    def cli(*args) -> int:
        with pytest.raises(SystemExit) as e:
            main(list(args))
        return e.value.code

    assert cli("ckpt", "verify", str(good)) == 0
    assert "every checksum matches" in capsys.readouterr().out
    assert cli("ckpt", "info", str(good)) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 2 and info["world_size"] == 1 and info["backend"] == "flatshard-rows"
    (good / "train_state.json").write_text("{}")
    assert cli("ckpt", "verify", str(good)) == 4
    assert "train_state.json" in capsys.readouterr().err


# -- sharded load of a pretrained HF folder ------------------------------------------------------------------
@pytest.mark.parametrize("tied,sharded", [(False, True), (True, False)])
def test_hf_folder_source_each_rank_reads_its_ranges(tmp_path, tied, sharded):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tied))
    folder = tmp_path / "hf"
    model.save_pretrained(folder, max_shard_size="10KB" if sharded else "1GB")
    assert (folder / "model.safetensors.index.json").is_file() is sharded
    full = {n: p.detach().reshape(-1) for n, p in model.named_parameters()}
    src = ckpt.HFFolderSource(folder)
    if tied:
        assert not src.has("lm_head.weight", "param") or "lm_head.weight" not in src.names()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if tied:  # a strategy whose model lists lm_head separately still gets the tied embedding
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    world = 3
    read_elems = 0
    for split in ("rows", "group"):
        for rank in range(world):
            s = FlatShardStrategy(shapes, split=split, rank=rank, world=world, seed=1)
            s.load_fragments(src)
            for name, p in s.params.items():
                a, b = s.ranges[name]
                assert torch.equal(p.detach(), full[name][a:b]), (split, rank, name)
                read_elems += b - a
    assert read_elems == 2 * sum(v.numel() for v in full.values())  # each element read once per split


def test_hf_load_pretrained_shape_mismatch(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "hf")
    shapes = {"model.embed_tokens.weight": (96, 24), "model.not_there.weight": (2,)}
    s = FlatShardStrategy(shapes, split="rows", rank=0, world=1)
    before = s.params["model.embed_tokens.weight"].detach().clone()
    with pytest.raises(CheckpointError) as e:
        ckpt.load_pretrained(s, tmp_path / "hf")
    msg = str(e.value)
    assert "model.embed_tokens.weight" in msg and "[97, 24]" in msg and "model.not_there.weight: missing" in msg
    assert torch.equal(s.params["model.embed_tokens.weight"], before)
    with pytest.raises(CheckpointError, match="pickle"):
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
        ckpt.HFFolderSource(tmp_path / "bin")


# -- the writer refuses an inconsistent tiling ----------------------------------------------------------------
def test_index_tiling_rules():
    from fft_dist.checkpoint.commit import build_index

    r0 = [["a", "param", [4], "float32", 0, 2, "f0", "k0"], ["a", "step", [1], "float32", 0, 1, "f0", "s0"]]
    r1 = [["a", "param", [4], "float32", 2, 4, "f1", "k1"], ["a", "step", [1], "float32", 0, 1, "f1", "s1"]]
    index = build_index([r0, r1], 2)
    assert index["tensors"]["a"]["kinds"]["step"]["ranges"] == [[0, 1, "f0", "s0"]]  # replicated: kept once
    with pytest.raises(CheckpointError, match=r"a \(param\): overlap at flat element 1"):
        build_index([r0, [["a", "param", [4], "float32", 1, 4, "f1", "k1"]]], 2)
    with pytest.raises(CheckpointError, match=r"a \(param\): stored ranges cover 2 of 4"):
        build_index([r0], 1)
    with pytest.raises(CheckpointError, match="disagree"):
        build_index([r0, [["a", "param", [2, 2], "float32", 2, 4, "f1", "k1"]]], 2)


def test_bad_strategy_commits_nothing(spec, good):
    """A strategy whose ranges leave a gap: the save fails and the previous checkpoint stays latest."""
    s = FlatShardStrategy(shapes_of(spec), split="rows", rank=0, world=1)
    name = next(iter(s.ranges))
    a, b = s.ranges[name]
    s.ranges[name] = (a + 1, b)
    s.params[name] = torch.nn.Parameter(s.params[name].detach()[1:].clone())
    with pytest.raises(CheckpointError, match=f"{name} \\(param\\): gap at flat element 0"):
        ckpt.save_checkpoint(s, ckpt_root=good.parent, step=3, train_state={}, keep_last=1, meta={}, run_id=RUN)
    assert (good.parent / "latest").read_text().strip() == good.name
    assert ckpt.find_resume("auto", good.parent) == good and not (good.parent / "step-0000003").exists()


def test_saving_an_existing_step_again_is_refused(spec, good):
    """A committed checkpoint is never saved over (e.g. a run resumed from an older one reaching a
    step saved before): refused on every rank, nothing changed, the temporary folder removed."""
    before = {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    s = reference(spec, 2)
    s.train_step(7)  # different state, same step number
    with pytest.raises(CheckpointError, match="never saves over a committed checkpoint"):
        ckpt.save_checkpoint(s, ckpt_root=good.parent, step=2, train_state={"step": 2, "again": True},
                             keep_last=2, meta={}, run_id=RUN)
    assert {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in good.parent.iterdir()) == ["latest", good.name]
