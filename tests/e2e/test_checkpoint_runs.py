"""End to end through the real trainer: exact resume, resharding, cross-backend resume, pre-emption, export.

Workers run as ``python -m torch.distributed.run --nproc_per_node N -m fft_dist.train ...`` (real
processes, gloo, fp32). The model has dimensions that do not divide by 2 or 4 (vocab 2051,
hidden 50, intermediate 101) and tied embeddings; the job uses accumulation 2 at 2 ranks,
evaluation every 2 steps and early-stopping bookkeeping, all of which must survive a resume.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, assert_close_rel, child_env, fft_dist, read_metrics
from checkpoint_runs import ODD_TIED_JOB, losses_by_step, stop_train_ranks, torchrun_train
from fft_dist import checkpoint as ckpt
from fft_dist.checkpoint import CheckpointReader


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold bit-identical parameters and optimizer states (any world size/backend)."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for name in ra.names():
        for kind in ("param", "exp_avg", "exp_avg_sq", "step"):
            assert ra.has(name, kind) and rb.has(name, kind), (name, kind)
            x, y = ra.read_full(name, kind), rb.read_full(name, kind)
            assert torch.equal(x, y), f"{name} ({kind}): max diff {(x - y).abs().max()}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """fsdp, 2 ranks, 8 steps, checkpoints at 4 and 8 saved asynchronously, and an HF export at the end."""
    run = tmp_path_factory.mktemp("full") / "run"
    torchrun_train(run, "checkpoint.export_final=true", "checkpoint.async_save=on")
    return run


def test_layout_and_export_of_a_real_run(uninterrupted):
    root = uninterrupted / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".fft-dist.lock", "latest", "step-0000004", "step-0000008"]
    info = ckpt.checkpoint_info(root / "step-0000008")
    assert (info["step"], info["backend"], info["world_size"]) == (8, "fsdp", 2)
    assert ckpt.verify_checkpoint(root / "step-0000008") == []
    state = ckpt.read_train_state(root / "step-0000008")
    assert "parallelism" in state["config_yaml"] and state["model_config"]["tie_word_embeddings"] is True
    index = json.loads((root / "step-0000008" / "index.json").read_text())
    assert "lm_head.weight" not in index["tensors"]  # tied: stored once
    # FSDP row shards of the 2051-row embedding: 1026 + 1025 rows
    ranges = index["tensors"]["model.embed_tokens.weight"]["kinds"]["param"]["ranges"]
    assert [(r[0], r[1]) for r in ranges] == [(0, 1026 * 50), (1026 * 50, 2051 * 50)]

    # the HF export (checkpoint.export_final) gives the training model's logits
    from transformers import AutoModelForCausalLM

    hf = uninterrupted / "hf"
    assert (hf / "config.json").is_file() and (hf / "model.safetensors.index.json").is_file()
    assert (hf / "tokenizer.json").is_file() and (hf / "generation_config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    from fft_dist.compose import compose, resolve, to_typed
    from fft_dist.model import build_model, hf_config

    cfg = to_typed(resolve(compose([f"run.dir={uninterrupted}", *ODD_TIED_JOB])))
    trained = build_model(hf_config(cfg.model)).eval()
    reader = CheckpointReader(root / "step-0000008")
    with torch.no_grad():
        for name, p in trained.named_parameters():
            p.copy_(reader.read_full(name))
    ids = torch.randint(0, 2051, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, exported(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_readme_ckpt_and_export_commands_on_a_real_run(uninterrupted, tmp_path):
    """The README's exact command shapes, through the real console script, on a trained checkpoint."""
    from transformers import AutoModelForCausalLM

    latest = uninterrupted / "checkpoints" / "latest"
    proc = fft_dist("ckpt", "verify", str(latest), timeout=120)
    assert proc.returncode == 0 and "step-0000008 is complete" in proc.stdout, proc.stderr[-3000:]
    proc = fft_dist("ckpt", "info", str(latest), timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["step"] == 8, proc.stderr[-3000:]
    out = tmp_path / "out" / "hf"
    proc = fft_dist("export", str(latest), str(out), "--dtype", "bfloat16", "--max-shard-size", "100KB", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    reader = CheckpointReader(uninterrupted / "checkpoints" / "step-0000008")
    assert torch.equal(model.model.embed_tokens.weight, reader.read_full("model.embed_tokens.weight").bfloat16())


def run_with_step4_of(source: Path, tmp_path: Path) -> Path:
    """A fresh run dir that holds only step 4 of ``source``: what a job stopped at step 4 leaves."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step-0000004", run / "checkpoints" / "step-0000004")
    return run


def resume_and_assert_exact(full_run: Path, tmp_path: Path, parallelism: str) -> None:
    """Stop at step 4 (its checkpoint), resume to 8: bit-identical losses, eval losses, weights, state.
    The full run saved asynchronously (checkpoint.async_save=on), the resumed one synchronously: a checkpoint
    written by the background writer while training went on holds exactly the state of its step."""
    saves = [r for r in read_metrics(full_run) if r.get("event") == "checkpoint"]
    assert [r["checkpoint_step"] for r in saves] == [4, 8] and all(r["ckpt_write_s"] > 0 for r in saves)
    run = run_with_step4_of(full_run, tmp_path)
    proc = torchrun_train(run, "resume=auto", "checkpoint.async_save=off", parallelism=parallelism)
    assert "checkpoints are synchronous" in proc.stdout
    full, resumed = losses_by_step(full_run), losses_by_step(run)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]  # bit-identical
    full_eval, resumed_eval = losses_by_step(full_run, "eval_loss"), losses_by_step(run, "eval_loss")
    assert [resumed_eval[s] for s in (6, 8)] == [full_eval[s] for s in (6, 8)]
    assert_same_state(full_run / "checkpoints" / "step-0000008", run / "checkpoints" / "step-0000008")
    a = ckpt.read_train_state(full_run / "checkpoints" / "step-0000008")["train_state"]
    b = ckpt.read_train_state(run / "checkpoints" / "step-0000008")["train_state"]
    assert a == b  # step, tokens seen, sampler position, best eval / early-stopping state


def test_exact_resume_fsdp(uninterrupted, tmp_path):
    resume_and_assert_exact(uninterrupted, tmp_path, "fsdp")


def test_resume_from_corrupt_checkpoint_exits_4_and_writes_nothing(uninterrupted, tmp_path):
    """One flipped byte in one rank's optimizer shard: every rank refuses it, naming the file."""
    from fft_dist.exit_codes import CHECKPOINT_ERROR

    run = run_with_step4_of(uninterrupted, tmp_path)
    good = run / "checkpoints" / "step-0000004"
    shard = good / "optim" / "shard-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")
              if p.name != ".fft-dist.lock"}
    proc = torchrun_train(run, f"resume={good}", expect_rc=1)  # torchrun itself exits 1; the ranks exit 4
    assert f"exitcode  : {CHECKPOINT_ERROR}" in proc.stderr, proc.stderr[-3000:]
    assert "optim/shard-00001-of-00002.safetensors" in proc.stderr, proc.stderr[-3000:]
    assert "sha256" in proc.stderr, proc.stderr[-3000:]
    after = {p.relative_to(run): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")
             if p.name != ".fft-dist.lock"}  # the job locks checkpoint.dir while it runs
    assert after == before, f"checkpoint files changed (nothing may be saved or pruned)\n{proc.stderr[-3000:]}"
    trained = (run / "metrics.jsonl").exists() and [r for r in read_metrics(run) if "loss" in r]
    assert not trained, f"a step ran from a corrupt checkpoint\n{proc.stderr[-3000:]}"


def test_nonfinite_loss_after_resume_keeps_the_last_good_checkpoint(uninterrupted, tmp_path):
    """Resume at step 4 with an absurd lr: the loss goes NaN/inf, exit 3, step-4 stays the newest."""
    from fft_dist.exit_codes import NONFINITE_LOSS

    run = run_with_step4_of(uninterrupted, tmp_path)
    root = run / "checkpoints"
    proc = torchrun_train(run, "resume=auto", "train.lr=1e30", "train.max_grad_norm=0",
                          "checkpoint.every_steps=1", expect_rc=1)
    assert f"exitcode  : {NONFINITE_LOSS}" in proc.stderr, proc.stderr[-3000:]
    assert "Lower train.lr" in proc.stderr, proc.stderr[-3000:]
    saved = sorted(p.name for p in root.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp"))
    last = saved[-1]
    # Every step that finished with a finite loss may have been saved; the failing one never is.
    assert all(ckpt.verify_checkpoint(root / name) == [] for name in saved)
    finite = [s for s, v in losses_by_step(run).items() if v == v and abs(v) != float("inf")]
    assert int(last.split("-")[1]) == (max(finite) if finite else 4)
    assert (root / "latest").read_text().strip() == last


def test_reshard_2_ranks_to_1(uninterrupted, tmp_path):
    """fsdp x 2 -> parallelism=none x 1 (accumulation 2 -> 4): same losses within round-off."""
    run = tmp_path / "run"
    proc = torchrun_train(run, f"resume={uninterrupted / 'checkpoints' / 'step-0000004'}", nproc=1,
                          parallelism="none")
    assert_async_chosen_under_the_banner(proc.stdout)
    full, resumed = losses_by_step(uninterrupted), losses_by_step(run)
    assert_close_rel([resumed[s] for s in range(5, 9)], [full[s] for s in range(5, 9)], 1e-5, "fsdp x2 -> none x1")


def assert_async_chosen_under_the_banner(stdout: str) -> None:
    """checkpoint.async_save=auto (the default) is decided before the first step, and the line under the banner
    says so and why: this tiny model's staging buffers fit this host's memory."""
    lines = stdout.splitlines()
    banner = next(i for i, line in enumerate(lines) if line.startswith("fft-dist: defaults on "))
    chosen = lines[banner + 1]
    assert chosen.startswith("fft-dist: checkpoints are asynchronous") and "staging buffers of" in chosen, \
        stdout[-3000:]


@pytest.mark.slow
def test_reshard_2_ranks_to_4(uninterrupted, tmp_path):
    run = tmp_path / "run"
    torchrun_train(run, f"resume={uninterrupted / 'checkpoints' / 'step-0000004'}", nproc=4)
    full, resumed = losses_by_step(uninterrupted), losses_by_step(run)
    assert_close_rel([resumed[s] for s in range(5, 9)], [full[s] for s in range(5, 9)], 1e-5, "fsdp x2 -> fsdp x4")


@pytest.mark.slow
def test_cross_backend_fsdp_to_zero3(uninterrupted, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    proc = torchrun_train(run, f"resume={uninterrupted / 'checkpoints' / 'step-0000004'}", parallelism="zero3")
    assert_async_chosen_under_the_banner(proc.stdout)  # DeepSpeed has made its optimizer states already
    full, resumed = losses_by_step(uninterrupted), losses_by_step(run)
    assert_close_rel([resumed[s] for s in range(5, 9)], [full[s] for s in range(5, 9)], 1e-5, "fsdp -> zero3")


@pytest.fixture(scope="module")
def uninterrupted_zero(tmp_path_factory):
    """zero2 / zero3 at 2 ranks, 8 steps, checkpoints at 4 and 8 (each run once per module, on demand)."""
    pytest.importorskip("deepspeed")
    runs: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in runs:
            runs[backend] = tmp_path_factory.mktemp(backend) / "run"
            torchrun_train(runs[backend], "checkpoint.async_save=on", parallelism=backend)
        return runs[backend]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_exact_resume_deepspeed(uninterrupted_zero, backend, tmp_path):
    """As test_exact_resume_fsdp, under DeepSpeed: the fp32 master, Adam states and step restore exactly."""
    full_run = uninterrupted_zero(backend)
    assert ckpt.checkpoint_info(full_run / "checkpoints" / "step-0000004")["backend"] == backend
    resume_and_assert_exact(full_run, tmp_path, backend)


@pytest.mark.slow
def test_cross_backend_zero2_to_fsdp(uninterrupted_zero, tmp_path):
    z2 = uninterrupted_zero("zero2")
    run = tmp_path / "run"
    torchrun_train(run, f"resume={z2 / 'checkpoints' / 'step-0000004'}", parallelism="fsdp")
    full, resumed = losses_by_step(z2), losses_by_step(run)
    assert_close_rel([resumed[s] for s in range(5, 9)], [full[s] for s in range(5, 9)], 1e-5, "zero2 -> fsdp")


def test_preemption_signal_checkpoints_and_resumes_exactly(uninterrupted, tmp_path):
    """SIGTERM to every rank (what SLURM does to all tasks) mid-run: finish the step, checkpoint,
    exit 75; then resume=auto in the same run dir finishes with bit-identical losses and weights."""

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "--monitor_interval", "0.2", "-m", "fft_dist.train", f"run.dir={run}", "parallelism=fsdp",
           *ODD_TIED_JOB, "checkpoint.every_steps=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            break  # step 1 is done
        time.sleep(0.01)
    stop_train_ranks(proc)
    stopped = losses_by_step(run)
    k = max(stopped)
    assert 1 <= k < 8, f"the signal should stop the run early (stopped after step {k})"
    assert ckpt.find_resume("auto", run / "checkpoints").name == f"step-{k:07d}"
    torchrun_train(run, "resume=auto", "checkpoint.every_steps=0")
    full, resumed = losses_by_step(uninterrupted), losses_by_step(run)
    assert [resumed[s] for s in range(1, 9)] == [full[s] for s in range(1, 9)]
    assert_same_state(uninterrupted / "checkpoints" / "step-0000008", run / "checkpoints" / "step-0000008")
