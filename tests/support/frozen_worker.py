"""Worker for tests/e2e/test_frozen_model.py: a frozen model hosted by each strategy (Strategy.host_frozen).

Run as one process (world size 1, backend none) or under
`python -m torch.distributed.run --nproc_per_node N tests/support/frozen_worker.py --backends fsdp zero2 zero3 ...`.
For every backend, in one process: the trainable model and the frozen one are built from the same seeded
builder; the worker records what tests/e2e/test_frozen_model.py asserts (logit differences, requires_grad,
gradients, eval mode, local parameter elements and bytes, fragments and a saved checkpoint) and writes
OUT/frozen.json (one row per rank) from rank 0.
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from deepspeed_worker import SEED, make_cfg, micro_batches, tiny_config, train_steps
from fft_dist import checkpoint as ckpt
from fft_dist.config import Precision, batch_plan
from fft_dist.dist import seed_everything
from worker_main import run_ranks
from fft_dist.model import build_model
from fft_dist.optim import lr_schedule, optimizer_factory
from fft_dist.strategy import make_strategy


def storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def frozen_locals(frozen) -> list[torch.Tensor]:
    """The tensors the frozen model keeps between forwards (DTensor shards, ZeRO partitions, plain tensors)."""
    from torch.distributed.tensor import DTensor

    out = []
    for p in frozen.module.parameters():
        if hasattr(p, "ds_tensor"):
            out.append(p.ds_tensor)
            if p.data.numel():
                out.append(p.data)
        else:
            out.append(p.to_local() if isinstance(p, DTensor) else p)
    return out


def logits(fn, batch) -> torch.Tensor:
    with torch.no_grad():
        return fn(batch["input_ids"], batch["attention_mask"]).logits.float().clone()


def estimated_kept(cfg, model_cfg, backend: str, world: int) -> dict:
    """`fft-dist estimate`'s per-GPU lines for the reference (fp32 and bf16) and theta0 of this very set-up."""
    import copy

    from fft_dist.config.loss import ReferenceDtype
    from fft_dist.memory import estimate, model_shape, setup_for

    cfg = copy.deepcopy(cfg)
    cfg.model.arch = {k: v for k, v in model_cfg.to_dict().items() if not k.startswith("_")}
    cfg.loss.kd.weight, cfg.loss.l2sp.weight = 0.5, 0.1
    shape = model_shape(cfg)
    out = {}
    for dtype in ("auto", "bf16"):
        cfg.loss.kd.reference_dtype = ReferenceDtype(dtype)
        row = estimate(shape, cfg, setup_for(cfg, backend, world))["per_gpu_bytes"]
        out[f"estimate_reference_{dtype}"] = row["kd_reference"]
        out["estimate_theta0"] = row.get("l2sp_theta0", 0)
    out["estimate_staging"] = estimate(shape, cfg, setup_for(cfg, backend, world))["staging_bytes_per_gpu"]
    return out


def check_backend(backend: str, args, ctx) -> dict:
    model_cfg = tiny_config(vocab=args.vocab)
    cfg = make_cfg(backend, micro=1, global_batch=ctx.world_size, steps=4)
    cfg.train.precision = Precision(args.precision)
    if backend == "hsdp":
        cfg.parallelism.shard_size = 2
    seed_everything(SEED, True)
    plan = batch_plan(cfg.train, ctx.world_size)
    strategy = make_strategy(cfg, plan, ctx)

    def build():
        torch.manual_seed(cfg.train.seed)
        return build_model(model_cfg)

    strategy.setup(build_model=build, make_optimizer=optimizer_factory(cfg.optimizer, cfg.train.lr),
                   lr_at=lr_schedule(cfg.train, cfg.train.max_steps))
    frozen = strategy.host_frozen(build)
    from fft_dist.loss.l2sp import Anchor

    anchor = Anchor.capture(0.1, strategy.fragments())  # theta0 as loss.l2sp holds it (its bytes are compared)
    anchor_bytes = sum(t.numel() * t.element_size() for t in anchor.start.values())
    del anchor
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in frozen.module.parameters())
    trainable_total = sum(int(getattr(p, "ds_numel", p.numel())) for p in
                          (getattr(strategy, "module", None) or strategy.model).parameters())
    batch = micro_batches(0, plan, ctx.rank, model_cfg.vocab_size)[0]
    strategy.train(False)
    before_train = logits(strategy.forward, batch)
    before_frozen = logits(frozen.forward, batch)
    train_steps(strategy, plan, ctx, model_cfg.vocab_size, range(2))  # two optimizer steps, with backward
    strategy.train(False)
    after_train = logits(strategy.forward, batch)
    after_frozen = logits(frozen.forward, batch)
    params = list(frozen.module.parameters())
    fragment_storages = storages(f.local for f in strategy.fragments())
    row = {
        "world": ctx.world_size, "total_numel": total, "trainable_total_numel": trainable_total,
        "local_numel": frozen.local_numel(),
        "local_bytes": sum(t.numel() * t.element_size() for t in frozen_locals(frozen)),
        "dtypes": sorted({str(p.dtype) for p in params}),
        "initial_diff": float((before_frozen - before_train).abs().max()),
        "frozen_drift": float((after_frozen - before_frozen).abs().max()),
        "trained_moved": float((after_train - before_train).abs().max()),
        "requires_grad": any(p.requires_grad for p in params),
        "grads": sum(p.grad is not None or getattr(getattr(p, "ds_tensor", None), "grad", None) is not None
                     for p in params),
        "output_requires_grad": frozen.forward(batch["input_ids"], batch["attention_mask"]).logits.requires_grad,
        "training_mode": any(m.training for m in getattr(frozen.module, "module", frozen.module).modules()),
        "shared_with_fragments": len(storages(frozen_locals(frozen)) & fragment_storages),
        "optimizer": type(getattr(frozen.module, "optimizer", None)).__name__,
    }
    from fft_dist.checkpoint.stage import staged_bytes

    row.update(anchor_bytes=anchor_bytes, staged_bytes=staged_bytes(strategy),  # what an async save copies
               **estimated_kept(cfg, model_cfg, backend, ctx.world_size))
    # A saved checkpoint holds the trainable model only: each tensor once, with the trained values.
    root = Path(args.out) / f"ckpt-{backend}"
    path = ckpt.save_checkpoint(strategy, ckpt_root=root, step=2, keep_last=1, run_id="f0f0f0f0f0f0f0f0",
                                train_state={"step": 2}, meta={"backend": backend, "config_yaml": "test: true\n"})
    reader = ckpt.CheckpointReader(path)
    row["checkpoint_param_numel"] = sum(
        r[1] - r[0] for t in reader.tensors.values() for r in t["kinds"].get("param", {}).get("ranges", []))
    # The seam loads weights: the frozen model filled from that checkpoint gives the trained logits.
    frozen.load_fragments(reader)
    row["loaded_diff"] = float((logits(frozen.forward, batch) - after_train).abs().max())
    if args.dtype == "bf16":  # the same builder, stored and run in bf16
        half = strategy.host_frozen(build, dtype=torch.bfloat16)
        row["bf16_dtypes"] = sorted({str(p.dtype) for p in half.module.parameters()})
        row["bf16_local_bytes"] = sum(t.numel() * t.element_size() for t in frozen_locals(half))
        row["bf16_diff"] = float((logits(half.forward, batch) - before_frozen).abs().max())
        del half
    del strategy, frozen, reader
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", nargs="+", required=True)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="train.precision")
    ap.add_argument("--dtype", choices=["none", "bf16"], default="bf16", help="also host a bf16 frozen copy")
    args = ap.parse_args()
    run_ranks(lambda ctx: {backend: check_backend(backend, args, ctx) for backend in args.backends}, args.out,
              "frozen.json", echo=True)


if __name__ == "__main__":
    main()
