"""Worker for tests/e2e/test_layer_lr.py: optimizer.layer_lr_decay on each strategy.

Run as one process (backend none) or under
`python -m torch.distributed.run --nproc_per_node 2 tests/support/layer_lr_worker.py --backends fsdp zero2 zero3 ...`.
For every backend, in one process: (a) one plain SGD step (no momentum, no decay, no clipping, constant lr)
with gamma = 1 and with gamma < 1 from the same seeded weights and batch; each rank's own fragment of every
parameter moves by lr * scale * grad, so the ratio of the two updates is the parameter's lr factor;
(b) a few AdamW steps with gamma < 1, whose losses the test compares across backends.
Writes OUT/layer_lr.json (one row per rank) from rank 0.
"""
from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist

from deepspeed_worker import IGNORE, SEED, all_reduce_sum, make_cfg, micro_batches, tiny_config, token_loss_sum
from fft_dist.config import OptimizerName, Schedule, SGDConfig, batch_plan
from fft_dist.dist import seed_everything
from worker_main import run_ranks
from fft_dist.model import build_model
from fft_dist.optim import lr_schedule, optimizer_factory
from fft_dist.strategy import make_strategy


def params(strategy) -> dict[str, torch.Tensor]:
    """Every full parameter, assembled from the ranks' fragments (each element is owned by one rank; the
    partitions differ with the parameter groups under ZeRO, so only full tensors compare)."""
    full: dict[str, torch.Tensor] = {}
    for f in strategy.fragments():
        if f.kind == "param":
            t = full.setdefault(f.name, torch.zeros(torch.Size(f.full_shape).numel()))
            t[f.flat_start:f.flat_stop] = f.local.detach().float()
    if dist.is_initialized():  # a rank may own nothing of a small tensor
        shapes = [None] * dist.get_world_size()
        dist.all_gather_object(shapes, {name: t.numel() for name, t in full.items()})
        for name, numel in sorted({k: v for s in shapes for k, v in s.items()}.items()):
            t = full.setdefault(name, torch.zeros(numel))
            dist.all_reduce(t)
    return full


def run(backend: str, ctx, model_cfg, gamma: float, sgd: bool, steps: int):
    cfg = make_cfg(backend, micro=1, global_batch=4, steps=steps)
    cfg.train.warmup_steps = 0
    cfg.train.lr_schedule = Schedule.constant
    if sgd:
        cfg.optimizer = SGDConfig(name=OptimizerName.sgd, momentum=0.0, weight_decay=0.0)
        cfg.train.max_grad_norm = 0.0
        cfg.train.lr = 50.0  # a large step: the update is far above the weights' fp32 rounding
    cfg.optimizer.layer_lr_decay = gamma
    seed_everything(SEED, True)
    plan = batch_plan(cfg.train, ctx.world_size)
    strategy = make_strategy(cfg, plan, ctx)

    def build():
        torch.manual_seed(cfg.train.seed)
        return build_model(model_cfg)

    strategy.setup(build_model=build, make_optimizer=optimizer_factory(cfg.optimizer, cfg.train.lr),
                   lr_at=lr_schedule(cfg.train, cfg.train.max_steps))
    before = params(strategy)
    losses = []
    strategy.train(True)
    for step in range(steps):
        batches = micro_batches(step, plan, ctx.rank, model_cfg.vocab_size)
        n_global = float(all_reduce_sum([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)])[0])
        total = 0.0
        for b in batches:
            loss = token_loss_sum(strategy.forward(b["input_ids"], b["attention_mask"]).logits, b["labels"]) / n_global
            strategy.backward(loss)
            total += float(loss.detach())
        losses.append(float(all_reduce_sum([total])[0]))
        strategy.step(step)
    delta = {k: v - before[k] for k, v in params(strategy).items()}
    del strategy
    gc.collect()
    return delta, losses


def check_backend(backend: str, args, ctx) -> dict:
    model_cfg = tiny_config(layers=args.layers)
    plain, _ = run(backend, ctx, model_cfg, 1.0, sgd=True, steps=1)
    decayed, _ = run(backend, ctx, model_cfg, args.gamma, sgd=True, steps=1)
    ratios = {}
    for key, d1 in plain.items():
        moved = d1.abs() > 0.05 * float(d1.abs().max())
        if moved.any():  # this rank's fragment: Δθ_γ / Δθ_1 over the elements that moved
            r = decayed[key][moved] / d1[moved]
            ratios[key] = [float(r.min()), float(r.max())]
    _, losses = run(backend, ctx, model_cfg, args.gamma, sgd=False, steps=3)
    return {"ratios": ratios, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", nargs="+", required=True)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args()
    run_ranks(lambda ctx: {backend: check_backend(backend, args, ctx) for backend in args.backends}, args.out,
              "layer_lr.json")


if __name__ == "__main__":
    main()
