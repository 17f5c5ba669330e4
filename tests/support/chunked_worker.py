"""Worker for tests/e2e/test_chunked_loss.py: the chunked loss (loss.chunk_size) against the full logits on a backend.

Run under `python -m torch.distributed.run --nproc_per_node 2 tests/support/chunked_worker.py --out OUT --backends fsdp zero2 zero3 hsdp`.
For every backend and model (an untied Llama, a tied one; --models gemma2 adds a soft-capped Gemma-2), in one process group: train
three optimizer steps of two micro batches each through the trainer's own loss path (StepLoss: counts,
``Strategy.forward(head=loss.head(batch))``, ``micro_batch``, backward, step) with loss.chunk_size=0 and with
a chunk of 5 tokens, then evaluate one no-grad batch; OUT/chunked.json holds the step losses, gradient norms
and eval losses per rank (rank 0 writes it).
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist

from deepspeed_worker import SEED, make, make_cfg, micro_batches, tiny_config
from fft_dist.config import LossConfig
from fft_dist.dist import all_reduce_sum, init_distributed, seed_everything
from fft_dist.loss import build_loss

CHUNK = 5


def model_config(name: str):
    if name == "gemma2":
        from transformers import Gemma2Config

        cfg = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           max_position_embeddings=128, final_logit_softcapping=2.0, sliding_window=32)
        cfg._attn_implementation = "eager"
        cfg.use_cache = False
        return cfg
    cfg = tiny_config(vocab=256)
    cfg.tie_word_embeddings = name == "tied"
    return cfg


def run(backend: str, model: str, chunk: int, ctx) -> dict:
    model_cfg = model_config(model)
    cfg = make_cfg(backend, micro=1, global_batch=2 * ctx.world_size, steps=3)
    if backend == "hsdp":  # a 2-replica mesh of 1-rank shard groups: the replicas' all-reduce is on the path
        cfg.parallelism.shard_size = 1
    seed_everything(SEED, True)
    strategy, plan = make(cfg, ctx, model_cfg)
    loss = build_loss(LossConfig(chunk_size=chunk), fmt="text", model_config=model_cfg)
    losses, norms = [], []
    strategy.train(True)
    for step in range(3):
        batches = micro_batches(step, plan, ctx.rank, model_cfg.vocab_size)
        counts = all_reduce_sum(loss.local_counts(batches), ctx.device)
        sums = loss.new_sums(ctx.device)
        for batch in batches:
            out = strategy.forward(batch["input_ids"], batch["attention_mask"], head=loss.head(batch))
            strategy.backward(loss.micro_batch(batch, out, counts, sums))
        norms.append(float(strategy.step(step)))  # the pre-clip global gradient norm
        losses.append(float(all_reduce_sum(sums, ctx.device)[0]) / float(counts[0]))
    strategy.train(False)
    batch = micro_batches(3, plan, ctx.rank, model_cfg.vocab_size)[0]
    with torch.no_grad():
        out = strategy.forward(batch["input_ids"], batch["attention_mask"], head=loss.head(batch))
        eval_sum = float(loss.main_sum(batch, out))
    row = {"losses": losses, "grad_norms": norms, "eval_sum": eval_sum, "logits_none": out.logits is None}
    del strategy, out
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", nargs="+", required=True)
    ap.add_argument("--models", nargs="+", default=["llama", "tied"], help="also: gemma2 (soft-capped, tied)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = init_distributed("gloo", 300)
    try:
        results = {f"{b}/{m}/{c}": run(b, m, c, ctx) for b in args.backends for m in args.models for c in (0, CHUNK)}
        rows = [None] * ctx.world_size
        dist.all_gather_object(rows, results)
        if ctx.rank == 0:
            (Path(args.out) / "chunked.json").write_text(json.dumps(rows, indent=1))
            print(json.dumps(rows[0], indent=1), flush=True)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from fft_dist.dist import exit_rank

    exit_rank(0)  # skip finalisation: torch 2.13's gloo can abort there (see exit_rank)
