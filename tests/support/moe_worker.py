"""Worker for tests/e2e/test_moe_checkpoints.py: one backend, every model folder in turn, through the Strategy
protocol and the real load_pretrained / save_checkpoint (as the trainer calls them).

Run as one process (``parallelism none``) or under ``python -m torch.distributed.run --nproc_per_node 2``.
For each ``--folder NAME=PATH``: build the strategy for the folder's config (FSDP2 builds on the meta
device, as with model.path), ``load_pretrained``, train ``--steps`` steps on fixed rows, recording the
first step's loss (summed token losses / tokens of the global batch), and save a checkpoint to
OUT/NAME. ``--starve``: from the second step on, rank 1's MoE routers send every token to experts 0
and 1 only, so the other experts get no tokens there (ZeRO-3 must not hang on it). Rank 0 writes
OUT/results.json: {NAME: {"loss": float, "checkpoint": path, "starved_router_calls": int}}.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist

from deepspeed_worker import IGNORE, make, make_cfg, micro_batches, token_loss_sum
from fft_dist import checkpoint as ckpt
from fft_dist.dist import all_reduce_sum, init_distributed, seed_everything

RUN = "0123456789abcdef"
VOCAB = 2048
ROUTERS = (("qwen2_moe", "Qwen2MoeTopKRouter"), ("qwen3_moe", "Qwen3MoeTopKRouter"), ("mixtral", "MixtralTopKRouter"))


def model_config(folder: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


STARVED = [0]  # router calls that starved experts on this rank


def starve_experts() -> list:
    """Patch every MoE router class so that each token goes to experts 0 .. top_k-1; returns the undo list."""
    import importlib

    undo = []
    for module, name in ROUTERS:
        cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        forward = cls.forward

        def starved(self, hidden_states, forward=forward):
            logits, scores, indices = forward(self, hidden_states)
            STARVED[0] += 1
            return logits, scores, torch.arange(indices.shape[-1]).expand_as(indices).contiguous()

        cls.forward = starved
        undo.append((cls, forward))
    return undo


def run_folder(name: str, folder: str, args, ctx) -> dict:
    cfg = make_cfg(args.backend, micro=2, global_batch=4, steps=args.steps)
    cfg.model.path = folder  # FSDP2 then builds on the meta device, as the trainer does with model.path
    seed_everything(cfg.train.seed, True)
    config = model_config(folder)
    if name in args.eager:
        config._experts_implementation = "eager"  # transformers' loop over the experts that got tokens
    strategy, plan = make(cfg, ctx, config)
    ckpt.load_pretrained(strategy, folder)
    first_loss, undo = None, []
    strategy.train(True)
    for step in range(args.steps):
        if step == 1 and args.starve and ctx.rank == 1:
            undo = starve_experts()
        batches = micro_batches(step, plan, ctx.rank, VOCAB)
        local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        n_global = float(all_reduce_sum([local])[0])
        total = 0.0
        for b in batches:
            loss = token_loss_sum(strategy.forward(b["input_ids"], b["attention_mask"]).logits, b["labels"])
            total += float(loss.detach())
            strategy.backward(loss / n_global)
        strategy.step(step)
        if first_loss is None:
            first_loss = float(all_reduce_sum([total])[0]) / n_global
    for cls, forward in undo:
        cls.forward = forward
    starved = int(all_reduce_sum([STARVED[0]])[0])
    STARVED[0] = 0
    path = ckpt.save_checkpoint(strategy, ckpt_root=Path(args.out) / name, step=args.steps, train_state={},
                                keep_last=1, run_id=RUN, meta={"model_config": config.to_dict()})
    del strategy
    gc.collect()
    return {"loss": first_loss, "checkpoint": str(path), "starved_router_calls": starved}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("--folder", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--starve", action="store_true")
    ap.add_argument("--eager", nargs="*", default=[], help="folders whose experts use the eager loop")
    args = ap.parse_args()
    ctx = init_distributed("gloo", 120)
    results = {}
    try:
        for item in args.folder:
            name, folder = item.split("=", 1)
            results[name] = run_folder(name, folder, args, ctx)
        if ctx.rank == 0:
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from fft_dist.dist import exit_rank

    exit_rank(0)  # skip finalisation: torch 2.13's gloo can abort there (see exit_rank)
