"""fft-dist `parallelism=fsdp` next to HF Trainer on a ~1B Llama-shaped model; tokens/s and MFU.

    python bench/gpu.py [--model 1b|tiny] [--gpus 1] [--steps 30] [--micro 4] [--seq 2048] [--ac] [--compile]
                        [--hf-path DIR] [--no-hf] [--json rows.json] [--no-record]

The model is built from config (random init, no download): `1b` is TinyLlama's shape (hidden 2048,
22 layers, MLP 5632, 32 heads, 4 KV heads, vocab 32000: 1.1B parameters). Both sides get the same
generated token rows (each exactly --seq tokens), micro batch, AdamW, clipping and constant lr, in
bf16 on a GPU (fp32 on CPU), with activation checkpointing (--ac) and torch.compile (--compile) on
or off for both. fft-dist runs `python -m fft_dist.cli train` with --gpus ranks (micro batch per
rank); HF Trainer runs this file's --hf-worker mode (one process, no DeepSpeed; Trainer needs
`accelerate`: --hf-path), so it is refused with --gpus > 1. Both run with their defaults for
determinism, the ones users get (fft-dist: train.deterministic=auto, false on a GPU and true on CPU, as
its metrics record; Trainer: full_determinism=False), and the table says which.

MFU is the trainer's own (fft_dist.metrics: 6 x matmul parameters, embeddings left out, plus
12 x layers x heads x head_dim x seq for attention, torchtitan's count) over the device's dense bf16
peak from fft_dist.metrics's table (H100 SXM / PCIe / NVL told apart) times the GPUs. The anchor:
torchtitan reports about 39% MFU for Llama 3 8B on H100 with FSDP and compile. On CPU there is no
peak figure, so MFU is left out; `--model tiny` is the CPU mode the test runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from machine_info import machine, record, versions  # noqa: E402
from throughput import model_arch, write_rows  # noqa: E402

MODELS = {
    "1b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
           "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "initializer_range": 0.02},
    "tiny": None,  # conf/model/tiny_llama.yaml
}
WARMUP_STEPS = 3


def env(extra_path: str = "") -> dict:
    e = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", ""), extra_path) if p)
    for k in ("FFT_DIST_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def fft_dist_run(args, arch: dict, data: Path, work: Path, precision: str) -> tuple[list[float], dict]:
    """Seconds per step of `fft-dist train parallelism=fsdp` on --gpus ranks, and what the run used."""
    run_dir = work / "fft"
    cmd = [sys.executable, "-m", "fft_dist.cli", "train", "parallelism=fsdp", f"launcher.nproc_per_node={args.gpus}",
           "model=tiny_llama", "model.name=bench_gpu", *(f"model.arch.{k}={v}" for k, v in arch.items() if k != "model_type"),
           "data=stdlib_text", f"data.path={data}", f"data.max_length={args.seq}", "data.eval_fraction=0",
           "data.shuffle=false", "eval.every_steps=0", f"train.max_steps={args.steps}",
           f"train.global_batch_size={args.micro * args.gpus}", f"train.micro_batch_size={args.micro}", "train.lr=1e-4",
           "train.lr_schedule=constant", f"train.precision={precision}", f"train.compile={str(args.compile).lower()}",
           f"model.activation_checkpointing={str(args.ac).lower()}",
           "checkpoint.save_final=false", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fft-dist failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in records if "loss" in r]
    tokens = args.micro * args.seq * args.gpus
    used = next(r for r in records if r.get("event") == "defaults")  # what train.deterministic=auto became
    return [tokens / r["tokens_per_s"] for r in rows], {
        "deterministic": used["deterministic"], "peak_mem_gib": max(r["peak_mem_mb"] for r in rows) / 1024}


def hf_run(args, arch_path: Path, data: Path, work: Path, precision: str) -> list[float]:
    out = work / "hf.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", "--arch-file", str(arch_path),
           "--data-file", str(data), "--out", str(out), "--steps", str(args.steps), "--micro", str(args.micro),
           "--seq", str(args.seq), "--precision", precision] + ["--ac"] * args.ac + ["--compile"] * args.compile
    proc = subprocess.run(cmd, cwd=REPO, env=env(args.hf_path), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"HF Trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())["step_s"]


def hf_worker(args) -> None:
    """HF Trainer on one device, the same job; writes each optimizer step's wall time."""
    import torch
    from loops import build_model, token_rows
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    rows = token_rows(args.data_file, args.seq)
    targs = TrainingArguments(
        output_dir=args.out + ".hf", per_device_train_batch_size=args.micro, max_steps=args.steps,
        learning_rate=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="constant", bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=args.ac, torch_compile=args.compile, save_strategy="no", report_to=[],
        logging_steps=10**6, dataloader_num_workers=0, disable_tqdm=True, seed=1234)
    timer = StepTimes()
    trainer = Trainer(model=build_model(args.arch_file), args=targs,
                      train_dataset=[{"input_ids": r, "labels": r} for r in rows], callbacks=[timer])
    trainer.train()
    Path(args.out).write_text(json.dumps({"step_s": timer.times}))


def summary(name: str, times: list[float], *, tokens: int, flops_per_token: float, peak: float | None,
            gpus: int = 1, **used) -> dict:
    """Median steady-state tokens/s and MFU (per GPU: over `gpus` x the device's peak)."""
    steady = times[WARMUP_STEPS:] or times
    tps = tokens / statistics.median(steady)
    return {"variant": name, "tokens_per_s": tps, "mfu": tps * flops_per_token / (peak * gpus) if peak else None,
            "steps": len(times), **used}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="1b")
    ap.add_argument("--gpus", type=int, default=1, help="fft-dist ranks (one per GPU); HF Trainer runs on one only")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing (both sides)")
    ap.add_argument("--compile", action="store_true", help="torch.compile (fft-dist: per layer; Trainer: whole model)")
    ap.add_argument("--hf-path", default="", help="a folder with `accelerate`, which HF Trainer needs")
    ap.add_argument("--no-hf", action="store_true", help="fft-dist only")
    ap.add_argument("--json")
    ap.add_argument("--no-record", action="store_true")
    # the Trainer subprocess
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch-file", help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hf_worker:
        hf_worker(args)
        return 0
    if args.gpus < 1:
        ap.error(f"--gpus {args.gpus}: use 1 or more")
    if args.gpus > 1 and not args.no_hf:
        ap.error("--gpus > 1: HF Trainer here runs on one GPU; add --no-hf")
    import torch

    from fft_dist.metrics import device_peak, flops_per_token

    on_gpu = torch.cuda.is_available()
    if on_gpu and torch.cuda.device_count() < args.gpus:
        ap.error(f"--gpus {args.gpus}: torch sees {torch.cuda.device_count()} GPU(s)")
    precision = "bf16" if on_gpu else "fp32"
    arch = MODELS[args.model] or {"model_type": "llama", **model_arch()}
    work = Path(tempfile.mkdtemp(prefix="fft-dist-bench-gpu-"))
    arch_path, data = work / "arch.json", work / "rows.jsonl"
    arch_path.write_text(json.dumps(arch))
    write_rows(data, n=args.micro * args.steps, seq=args.seq)
    from loops import build_model

    with torch.device("meta"):
        model = build_model(str(arch_path))
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model, model.config, args.seq)
    dev = torch.cuda.get_device_name(0) if on_gpu else "CPU"
    part = device_peak(dev) if on_gpu else None
    peak = part[1] if part else None
    times, used = fft_dist_run(args, arch, data, work, precision)
    rows = [summary(f"fft-dist fsdp x{args.gpus}", times, tokens=args.micro * args.seq * args.gpus,
                    flops_per_token=fpt, peak=peak, gpus=args.gpus, **used)]
    if not args.no_hf:
        rows.append(summary("HF Trainer x1", hf_run(args, arch_path, data, work, precision), tokens=args.micro * args.seq,
                            flops_per_token=fpt, peak=peak, deterministic=False, peak_mem_gib=None))
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    lines = ["| variant | tokens/s | MFU | deterministic | peak memory (GiB) | steps |", "|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak FLOP/s for this device)"
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {mfu} | {r['deterministic']} | {mem} | {r['steps']} |")
    peak_text = (f"{part[0]}, {part[1] / 1e12:.0f} TFLOP/s dense bf16" if part
                 else "none known" if on_gpu else "none (CPU)")
    alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or (
        "expandable_segments:True (fft-dist's default)" if torch.version.cuda else "unset (a CPU build of torch)")
    text = "\n".join([
        f"## {'One device' if args.gpus == 1 else f'{args.gpus} devices'}: fft-dist fsdp against HF Trainer "
        f"({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        f"- command: `python bench/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}; device: {dev} x{args.gpus} (peak: {peak_text}); PYTORCH_CUDA_ALLOC_CONF={alloc}",
        f"- versions: {versions('torch', 'transformers')}",
        f"- job: {args.model} ({n_params / 1e9:.2f}B params, {fpt / 1e9:.2f} GFLOP per token), micro {args.micro} "
        f"x seq {args.seq} per GPU, {precision}, "
        f"activation checkpointing {'on' if args.ac else 'off'}, compile {'on' if args.compile else 'off'}; "
        f"median step after the first {WARMUP_STEPS}; peak memory: torch.cuda.max_memory_allocated on a GPU, peak RSS "
        "on CPU (rank 0). Anchor: torchtitan ~39% MFU (Llama 3 8B, H100, FSDP + compile).",
        "",
        *lines,
        "",
    ])
    record(text, no_record=args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
