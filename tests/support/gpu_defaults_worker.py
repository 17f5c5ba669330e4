"""Worker for tests/e2e/test_device_defaults.py (issue 17), under `python -m torch.distributed.run --nproc_per_node 2`.

Modes (results go to OUT/<mode>.json, one row per rank):
  bf16        zero2 and zero3 with train.precision=bf16, parallelism.bf16_weights false (autocast over fp32
              weights) and true (DeepSpeed's bf16 mode): 2 steps each; losses, and what the engine really runs.
  zero2build  ZeRO-2's initial model (tied embeddings): peak host RSS of the build that rank 0 alone now does,
              against every rank building it (before), and the weights each rank ends up with.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from deepspeed_worker import (
    IGNORE, SEED, _trim, make, make_cfg, measure_peak, micro_batches, tiny_config, token_loss_sum)
from fft_dist.config import Precision
from fft_dist.dist import all_reduce_sum, seed_everything
from worker_main import run_ranks


def run_steps(strategy, plan, ctx, vocab: int, steps: int) -> list[float]:
    """The trainer's loop (loss sum / global tokens), returning each step's global mean loss."""
    strategy.train(True)
    losses = []
    for step in range(steps):
        batches = micro_batches(step, plan, ctx.rank, vocab)
        n_global = float(all_reduce_sum([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)])[0])
        total = 0.0
        for b in batches:
            loss = token_loss_sum(strategy.forward(b["input_ids"], b["attention_mask"]).logits, b["labels"])
            strategy.backward(loss / n_global)
            total += float(loss.detach())
        strategy.step(step)
        losses.append(float(all_reduce_sum([total])[0]) / n_global)
    return losses


def mode_bf16(args, ctx) -> list[dict]:
    model_cfg = tiny_config()
    rows = []
    for stage in ("zero2", "zero3"):
        for weights in (False, True):
            cfg = make_cfg(stage, micro=2, global_batch=2 * ctx.world_size, steps=2)
            cfg.train.precision = Precision.bf16
            cfg.parallelism.bf16_weights = weights
            seed_everything(SEED, True)
            strategy, plan = make(cfg, ctx, model_cfg)
            losses = run_steps(strategy, plan, ctx, model_cfg.vocab_size, 2)
            engine, param = strategy.engine, next(strategy.module.parameters())
            rows.append({"stage": stage, "bf16_weights": weights, "losses": losses,
                         "ds_bf16": strategy.ds_config["bf16"]["enabled"],
                         "ds_communication": strategy.ds_config.get("communication_data_type"),
                         "engine_bf16": engine.bfloat16_enabled(),
                         "engine_communication": str(engine.communication_data_type),
                         "working_dtype": str(getattr(param, "ds_tensor", param).dtype),
                         "master_dtype": str(strategy._flat_partitions()[0][0].dtype)})
            strategy = engine = param = None
    return rows


def mode_zero2build(args, ctx) -> list[dict]:
    from fft_dist.model import build_model
    from fft_dist.strategy.initial import build_replicated

    model_cfg = tiny_config(scale=6, vocab=2048, layers=16, intermediate=1024)  # 27.5M params, 110 MB in fp32
    model_cfg.tie_word_embeddings = True  # rank 1's meta build must come out tied as rank 0's
    build_model(tiny_config())  # warm-up: import the modeling code outside the measurement
    calls: list[dict] = []

    def build(measure: bool):
        def run():
            torch.manual_seed(SEED)
            if not measure:
                return build_model(model_cfg)
            growth, model = measure_peak(lambda: build_model(model_cfg))
            calls.append({"host_build_bytes": growth, "on_meta": next(model.parameters()).is_meta})
            return model
        return run

    # before: every rank built the seeded full model on the host, then moved it to its device
    before, model = measure_peak(lambda: build(False)().to(ctx.device))
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    _trim()
    dist.barrier()
    # now, once to measure the whole phase (on CPU the device copy is host memory too), once per build call
    whole, model = measure_peak(lambda: build_replicated(build(False), ctx.device, meta_init=False))
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    del model
    _trim()
    dist.barrier()
    model = build_replicated(build(True), ctx.device, meta_init=False)
    del model
    return [{"rank": ctx.rank, "full_bytes": full_bytes, "before_every_rank_builds": before,
             "now_whole_phase": whole, "now_build_calls": calls, "checksum": checksum, "tied": tied}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["bf16", "zero2build"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run_ranks(lambda ctx: {"bf16": mode_bf16, "zero2build": mode_zero2build}[args.mode](args, ctx), args.out,
              f"{args.mode}.json", echo=True)


if __name__ == "__main__":
    main()
