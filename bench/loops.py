"""The baselines bench/throughput.py measures fft-dist against: minimal hand-written loops, and HF Trainer.

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/loops.py \
        --loop fsdp2|ds2|ds3|hf_ds3 --data rows.jsonl --arch arch.json --steps 20 --micro 4 --seq 128 --out t.json
    python bench/loops.py --loop single ...   (one plain process, no torchrun, no process group)

Written the way a user would write them, with nothing from fft_dist: the same tokenizer, model
config, AdamW (lr 1e-3, weight decay 0.1, betas 0.9/0.95), clipping 1.0 and global batch as the
fft-dist job. Rank 0 writes each step's wall time (data to optimizer step, no barrier, as fft-dist
logs it) and the tokens of the global batch to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

TOKENIZER = Path(__file__).resolve().parents[1] / "fft_dist" / "assets" / "tokenizer"
LR, WD, BETAS, CLIP = 1e-3, 0.1, (0.9, 0.95), 1.0
CPU_BUCKET = 2_000_000  # fft-dist's CPU buckets (DeepSpeed's 5e8 defaults allocate 2 GB on CPU)


def token_rows(path: str, seq: int) -> list[list[int]]:
    """The JSONL text rows, tokenised without special tokens and cut to `seq` tokens (fft-dist's encoding)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [ids[:seq] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert all(len(r) == seq for r in rows), "every generated row must be at least seq tokens long"
    return rows


def build_model(arch_path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = json.loads(Path(arch_path).read_text())
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    config.use_cache = False
    torch.manual_seed(1234)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def batches(rows: list[list[int]], *, rank: int, world: int, micro: int, steps: int):
    """Step s, this rank: `micro` consecutive rows of the step's global batch."""
    per_step = micro * world
    for s in range(steps):
        start = (s * per_step + rank * micro) % len(rows)
        ids = torch.tensor([rows[(start + i) % len(rows)] for i in range(micro)])
        yield ids


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, weight_decay=WD)


def fsdp2_loop(args, rows) -> list[float]:
    from torch.distributed.fsdp import fully_shard

    model = build_model(args.arch)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return timed_steps(model, batches(rows, rank=dist.get_rank(), world=dist.get_world_size(), micro=args.micro,
                                      steps=args.steps))


def single_loop(args, rows) -> list[float]:
    """One process, no process group: what `parallelism=none` is measured against."""
    return timed_steps(build_model(args.arch), batches(rows, rank=0, world=1, micro=args.micro, steps=args.steps))


def timed_steps(model, micro_batches) -> list[float]:
    """The plain torch step (forward, backward, clip, AdamW) over each batch; seconds per step."""
    opt = optimizer(model)
    times = []
    for ids in micro_batches:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def ds_config(stage: int, micro: int, world: int) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": CPU_BUCKET, "allgather_bucket_size": CPU_BUCKET}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=CPU_BUCKET, stage3_param_persistence_threshold=0)
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "train_batch_size": micro * world, "gradient_clipping": CLIP, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def deepspeed_loop(args, rows, stage: int) -> list[float]:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    model = build_model(args.arch)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer(model),
                                           config=ds_config(stage, args.micro, dist.get_world_size()))
    times = []
    for ids in batches(rows, rank=dist.get_rank(), world=dist.get_world_size(), micro=args.micro, steps=args.steps):
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def hf_trainer_loop(args, rows) -> list[float]:
    """transformers.Trainer with its DeepSpeed ZeRO-3 integration, use_cpu=True (its FSDP path is DDP on CPU)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimes(TrainerCallback):
        """One full loop iteration per step, from one on_step_end to the next (the first from on_step_begin):
        Trainer fetches each batch and counts its tokens (get_batch_samples) before on_step_begin, and
        fft-dist's logged step time includes its collation and token-count all-reduce."""

        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.times.append(now - self.t0)
            self.t0 = now

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)  # else DeepSpeed sees world 1 on CPU
    world = dist.get_world_size()
    ds = ds_config(3, args.micro, world)
    ds.update(train_micro_batch_size_per_gpu="auto", train_batch_size="auto", gradient_accumulation_steps="auto",
              gradient_clipping="auto")
    targs = TrainingArguments(
        output_dir=args.out + ".hf", per_device_train_batch_size=args.micro, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        max_grad_norm=CLIP, lr_scheduler_type="constant", use_cpu=True, deepspeed=ds, save_strategy="no",
        report_to=[], logging_steps=10**6, dataloader_num_workers=0, disable_tqdm=True, seed=1234)
    data = [{"input_ids": r, "labels": r} for r in rows]
    timer = StepTimes()
    trainer = Trainer(model=build_model(args.arch), args=targs, train_dataset=data, callbacks=[timer])
    trainer.train()
    return timer.times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--loop", required=True, choices=["single", "fsdp2", "ds2", "ds3", "hf_ds3"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--micro", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.loop != "single":
        dist.init_process_group("gloo")
    rows = token_rows(args.data, args.seq)
    if args.loop == "single":
        times = single_loop(args, rows)
    elif args.loop == "fsdp2":
        times = fsdp2_loop(args, rows)
    elif args.loop in ("ds2", "ds3"):
        times = deepspeed_loop(args, rows, int(args.loop[-1]))
    else:
        times = hf_trainer_loop(args, rows)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({"step_s": times, "tokens_per_step": args.micro * args.seq
                                              * int(os.environ.get("WORLD_SIZE", "1"))}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
