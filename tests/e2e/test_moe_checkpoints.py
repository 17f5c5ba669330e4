"""Mixture-of-Experts (and tied) folders written by ``save_pretrained`` load on every backend, export in the
layout ``save_pretrained`` writes, and a folder in a layout transformers cannot map is refused before launch.

Folders: tiny (hidden 64, 2 layers, 4 experts, top-2) Qwen2-MoE, Qwen3-MoE and Mixtral, random weights, one
tensor per expert on disk while transformers 5 builds fused ``mlp.experts.gate_up_proj`` [E, 2I, H], plus a
Qwen2 with ``tie_word_embeddings`` (no lm_head on disk). One worker job per backend loads them all in turn
(tests/support/moe_worker.py): its first-step loss must equal ``from_pretrained`` + forward on the same micro
batches, and its checkpoint must export to exactly ``save_pretrained``'s keys and shapes, with the same logits.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fft_dist import checkpoint as ckpt
from helpers import REPO, TINY_TRAIN, child_env, descendants, fft_dist, SUPPORT
from moe_checkpoints_shared import folders


WORKER = str(SUPPORT / "moe_worker.py")


WATCHDOG = 240  # s: a hung collective fails the test instead of hanging CI


def run_worker(backend: str, folders: dict[str, Path], out: Path, *, nproc: int, steps: int = 2,
               starve: bool = False, eager: tuple[str, ...] = ()) -> dict:
    args = [f"--backend={backend}", f"--out={out}", f"--steps={steps}"]
    args += [f"--folder={n}={p}" for n, p in folders.items()]
    args += ["--starve"] * starve + (["--eager", *eager] if eager else [])
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
         "--monitor_interval", "0.2"]
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env["PYTHONPATH"]])
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*launcher, WORKER, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=WATCHDOG)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:  # the ranks first, then their launcher
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate()
        pytest.fail(f"{backend} x {nproc}: no result after {WATCHDOG} s (a hang?)\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return json.loads((out / "results.json").read_text())


def reference_loss(folder: Path, nproc: int) -> float:
    """``from_pretrained`` + forward on the worker's first-step micro batches (every rank's): token losses / tokens."""
    from transformers import AutoModelForCausalLM

    from deepspeed_worker import IGNORE, micro_batches, token_loss_sum
    from fft_dist.config import batch_plan
    from moe_worker import VOCAB, make_cfg

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
    plan = batch_plan(make_cfg("none" if nproc == 1 else "fsdp", micro=2, global_batch=4, steps=2).train, nproc)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for rank in range(nproc):
            for b in micro_batches(0, plan, rank, VOCAB):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                total += float(token_loss_sum(logits, b["labels"]))
                tokens += int((b["labels"][:, 1:] != IGNORE).sum())
    return total / tokens


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    return out


def check_export(checkpoint: Path, tmp: Path) -> None:
    """Export, then: the same keys and shapes as save_pretrained of the checkpoint's model, and from_pretrained of
    the export gives that model's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = ckpt.read_train_state(checkpoint)
    mc = {k: v for k, v in state["model_config"].items() if k != "transformers_version"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc)).eval()
    reader = ckpt.CheckpointReader(checkpoint)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reader.read_full(name))
    model.save_pretrained(tmp / "save_pretrained")
    ckpt.export_hf(checkpoint, tmp / "export", max_shard_size="64KB")
    assert safetensors_shapes(tmp / "export") == safetensors_shapes(tmp / "save_pretrained")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp / "export"), dtype=torch.float32).eval()
    ids = torch.randint(0, 2048, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def check_backend(backend: str, nproc: int, folders: dict[str, Path], tmp: Path, *, export: bool, **kw) -> dict:
    results = run_worker(backend, folders, tmp / "worker", nproc=nproc, **kw)
    for name, folder in folders.items():
        want = reference_loss(folder, nproc)
        got = results[name]["loss"]
        assert abs(got - want) <= 1e-5 * want, f"{backend} x {nproc}, {name}: first-step loss {got} != {want}"
        if export:
            check_export(Path(results[name]["checkpoint"]), tmp / name)
    return results


def test_fsdp_loads_and_exports_every_family(folders, tmp_path):
    """fsdp x 2 (each rank reads its experts only): loss = from_pretrained's; export = save_pretrained's layout;
    the tied Qwen2 exports without lm_head and loads back tied."""
    check_backend("fsdp", 2, folders, tmp_path, export=True)
    keys = safetensors_shapes(tmp_path / "qwen2_tied" / "export")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in safetensors_shapes(tmp_path / "qwen2_moe" / "export")
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in safetensors_shapes(tmp_path / "mixtral" / "export")


def test_zero3_loads_and_survives_starved_experts(folders, tmp_path):
    """zero3 x 2: the MoE folders load (loss = from_pretrained's); then rank 1 routes every token to experts 0
    and 1, so experts 2 and 3 get no tokens there (Mixtral through transformers' eager loop over the experts
    that got tokens, the others through grouped_mm) for steps 2 and 3; they finish within the watchdog."""
    moe = {n: p for n, p in folders.items() if n != "qwen2_tied"}
    results = check_backend("zero3", 2, moe, tmp_path, export=False, steps=3, starve=True, eager=("mixtral",))
    assert all(r["starved_router_calls"] == 4 for r in results.values()), results  # 2 steps x 2 layers on rank 1


@pytest.mark.parametrize("backend,nproc", [("zero2", 2), ("none", 1)])
def test_loads_and_exports_every_family(folders, tmp_path, backend, nproc):
    """zero2 x 2 and a single process: every family's loss = from_pretrained's, export = save_pretrained's layout."""
    check_backend(backend, nproc, folders, tmp_path, export=True)


@pytest.mark.slow
def test_zero3_exports_every_family(folders, tmp_path):
    """zero3 x 2 without starved experts: every family's loss = from_pretrained's, export = save_pretrained's layout."""
    check_backend("zero3", 2, folders, tmp_path, export=True)


def test_unmappable_layout_is_refused_before_launch(folders, tmp_path):
    """A folder whose expert tensors are named in a layout transformers has no conversion for: exit 2 before any
    rank starts, naming the parameters nothing makes and the tensors nothing uses (headers only)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    src = folders["mixtral"]
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    with safe_open(str(src / "model.safetensors"), framework="pt") as h:
        tensors = {k.replace(".w1.", ".fc_in.") if ".experts." in k else k: h.get_tensor(k) for k in h.keys()}
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path / "run"
    proc = fft_dist("train", f"run.dir={run}", "parallelism=fsdp", "launcher.nproc_per_node=2", f"model.path={bad}",
                    *TINY_TRAIN, timeout=120, env=child_env())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr
    assert "cannot be mapped onto" in err and "starting" not in proc.stdout + err
    assert "model.layers.0.mlp.experts.gate_up_proj" in err  # missing
    assert "model.layers.0.block_sparse_moe.experts.0.fc_in.weight" in err  # in the folder, used by nothing
