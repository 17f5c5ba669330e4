"""`fft-dist export --interpolate-base alpha --base FOLDER` (issue 20): (1 - alpha) * theta + alpha * theta_0,
streamed tensor by tensor like the plain export. In process, tiny Llama checkpoints: alpha = 0 is the plain
export byte for byte, alpha = 1 the base's tensors, alpha = 0.5 the midpoint, and transformers loads the
result; without --base, or with alpha outside [0, 1], the command exits 2 naming what to pass."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoint_helpers import TINY_LLAMA, save, strategy
from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint.interpolate import base_hint
from fft_dist.cli import export as export_command


def llama(root: Path, seed: int, model_path: str | None = None) -> Path:
    from transformers import LlamaConfig

    from checkpoint_worker import llama_shapes

    cfg = LlamaConfig(**TINY_LLAMA)
    meta = {"model_config": cfg.to_dict(), "backend": "flatshard-rows", "model_path": model_path}
    return save(root, 1, s=strategy(llama_shapes(cfg), steps=1, seed=seed), meta=meta)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interp")
    base = tmp / "base-hf"
    ckpt.export_hf(llama(tmp / "base-ckpt", seed=7), base)
    trained = llama(tmp / "run", seed=0, model_path=str(base))
    plain = tmp / "plain"
    ckpt.export_hf(trained, plain)
    outs = {}
    for alpha in (0.0, 0.5, 1.0):
        outs[alpha] = tmp / f"alpha-{alpha}"
        ckpt.export_hf(trained, outs[alpha], interpolate_base=alpha, base=base)
    return {"base": base, "trained": trained, "plain": plain, **outs}


def test_alpha_0_is_the_plain_export_byte_for_byte(exported):
    files = sorted(p.name for p in exported["plain"].iterdir())
    assert files == sorted(p.name for p in exported[0.0].iterdir())
    for name in files:
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            assert (exported["plain"] / name).read_bytes() == (exported[0.0] / name).read_bytes(), name


def test_alpha_1_is_the_base_and_alpha_half_the_midpoint(exported):
    base, plain = tensors(exported["base"]), tensors(exported["plain"])
    one, half = tensors(exported[1.0]), tensors(exported[0.5])
    assert base.keys() == plain.keys() == one.keys() == half.keys()
    moved = 0
    for key in base:
        assert torch.equal(one[key], base[key]), key
        assert torch.allclose(half[key], (plain[key] + base[key]) / 2, atol=1e-7, rtol=0), key
        moved += int(not torch.equal(plain[key], base[key]))
    assert moved == len(base), "the base and the trained weights must differ, or the test proves nothing"


def test_transformers_loads_the_interpolated_folder(exported):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exported[0.5])).eval()
    want = tensors(exported[0.5])["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight.detach(), want)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_without_base_or_with_alpha_outside_0_1_the_command_exits_2(exported, tmp_path, capsys):
    assert export_command([str(exported["trained"]), str(tmp_path / "o1"), "--interpolate-base", "0.3"]) == 2
    err = capsys.readouterr().err
    assert f"pass --base {exported['base']}" in err, err  # the recorded model.path, named, never opened
    assert export_command([str(exported["trained"]), str(tmp_path / "o2"), "--interpolate-base", "1.5",
                           "--base", str(exported["base"])]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert "seeded weights" in base_hint({"meta": {"model_path": None}})


def test_a_base_of_another_shape_is_refused(exported, tmp_path):
    from transformers import LlamaConfig

    from checkpoint_worker import llama_shapes

    other = dict(TINY_LLAMA, intermediate_size=32)
    cfg = LlamaConfig(**other)
    wrong = save(tmp_path / "w", 1, s=strategy(llama_shapes(cfg), steps=1, seed=3),
                 meta={"model_config": cfg.to_dict(), "backend": "flatshard-rows"})
    ckpt.export_hf(wrong, tmp_path / "wrong-hf")
    with pytest.raises(ckpt.CheckpointError, match=r"--base .*has shape"):
        ckpt.export_hf(exported["trained"], tmp_path / "o", interpolate_base=0.5, base=tmp_path / "wrong-hf")
    assert not (tmp_path / "o").exists()
