"""Worker for tests/e2e/test_deepspeed.py: drives strategies through the Strategy protocol only.

Run as one process (`python tests/support/deepspeed_worker.py ...`, world size 1) or under
`python -m torch.distributed.run --nproc_per_node 2 tests/support/deepspeed_worker.py ...`.

Modes (results go to OUT/<mode>.json):
  memory  per-rank bytes of every tensor held, by category, after backward and after step, on
          synthetic rows of unequal length (the loop is the trainer's: backward(sum / N), step).
  build   peak RSS while building a model under the strategy (ZeRO-3: zero.Init) and plainly.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fft_dist.config import FFTConfig, Parallelism, batch_plan
from fft_dist.dist import all_reduce_sum, init_distributed, seed_everything
from fft_dist.optim import lr_schedule, optimizer_factory
from fft_dist.strategy import make_strategy

IGNORE = -100
SEED = 1234
TORCH_LINEAR = F.linear  # DeepSpeed's zero.Init replaces torch.nn.functional.linear; the strategy puts it back


def tiny_config(scale: int = 1, vocab: int = 256, layers: int = 2, intermediate: int = 0):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64 * scale, intermediate_size=intermediate or 128 * scale,
        num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        initializer_range=0.02, rms_norm_eps=1e-5,
    )
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    return cfg


def make_cfg(backend: str, *, micro: int, global_batch: int, steps: int, bucket: int = 2_000_000) -> FFTConfig:
    cfg = FFTConfig()
    cfg.parallelism.name = Parallelism(backend)
    if backend in ("zero2", "zero3"):  # the other backends refuse DeepSpeed options
        cfg.parallelism.reduce_bucket_size = bucket
        cfg.parallelism.allgather_bucket_size = bucket
    if backend == "zero3":
        cfg.parallelism.prefetch_bucket_size = bucket
    cfg.train.micro_batch_size = micro
    cfg.train.global_batch_size = global_batch
    cfg.train.max_steps = steps
    cfg.train.lr = 1e-3
    cfg.train.warmup_steps = 2
    cfg.train.max_grad_norm = 1.0
    cfg.train.seed = SEED
    return cfg


def rows_for_step(step: int, global_batch: int, vocab: int) -> list[torch.Tensor]:
    """Learnable rows of unequal length (arithmetic sequences mod vocab) that depend only on the step."""
    g = torch.Generator().manual_seed(10_000 + step)
    out = []
    for _ in range(global_batch):
        n = int(torch.randint(5, 33, (1,), generator=g))
        start = int(torch.randint(0, vocab, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        out.append((start + stride * torch.arange(n)) % (vocab - 1) + 1)
    return out


def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = r
        labels[i, :n] = r
        labels[i, : min(3, n - 2)] = IGNORE  # a short "prompt" without loss
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def micro_batches(step: int, plan, rank: int, vocab: int) -> list[dict]:
    rows = rows_for_step(step, plan.global_batch_size, vocab)
    per_rank = len(rows) // plan.world_size
    mine = rows[rank * per_rank : (rank + 1) * per_rank]
    return [collate(mine[i : i + plan.micro_batch_size]) for i in range(0, len(mine), plan.micro_batch_size)]


def token_loss_sum(logits, labels):
    shift = logits[:, :-1, :].float()
    return F.cross_entropy(shift.reshape(-1, shift.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def make(cfg: FFTConfig, ctx, model_cfg):
    from fft_dist.model import build_model

    plan = batch_plan(cfg.train, ctx.world_size)
    strategy = make_strategy(cfg, plan, ctx)

    def build():
        torch.manual_seed(cfg.train.seed)
        return build_model(model_cfg)

    lr_at = lr_schedule(cfg.train, cfg.train.max_steps)
    strategy.setup(build_model=build, make_optimizer=optimizer_factory(cfg.optimizer, cfg.train.lr), lr_at=lr_at)
    return strategy, plan


def train_steps(strategy, plan, ctx, vocab: int, steps: range) -> None:
    strategy.train(True)
    for step in steps:
        batches = micro_batches(step, plan, ctx.rank, vocab)
        local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        n_global = float(all_reduce_sum([local])[0])
        for b in batches:
            logits = strategy.forward(b["input_ids"], b["attention_mask"]).logits
            strategy.backward(token_loss_sum(logits, b["labels"]) / n_global)
        strategy.step(step)


# -- memory -------------------------------------------------------------------------------------
def tensor_bytes(module=None) -> int:
    """Bytes of every distinct storage that a live Python tensor refers to.

    A plain parameter's .grad has no Python object until someone reads it, so the gradients of
    ``module`` are added explicitly (storages are deduplicated, nothing counts twice).
    """
    from torch.distributed.tensor import DTensor

    grads = []
    if module is not None:
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in module.parameters() if p.grad is not None]
    seen: dict[int, int] = {}
    for obj in [*gc.get_objects(), *grads]:
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                st = obj.untyped_storage()
                ptr = st.data_ptr()
                if ptr:
                    seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except Exception:
            continue
    return sum(seen.values())


def mode_memory(args, ctx) -> None:
    out = Path(args.out)
    model_cfg = tiny_config(scale=args.scale, vocab=args.vocab, layers=args.layers, intermediate=args.intermediate)
    results = {}
    for backend in args.backends:
        gc.collect()
        base = tensor_bytes()
        cfg = make_cfg(backend, micro=1, global_batch=ctx.world_size, steps=4, bucket=args.bucket)
        seed_everything(SEED, True)
        strategy, plan = make(cfg, ctx, model_cfg)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in strategy_module(strategy).parameters())
        train_steps(strategy, plan, ctx, model_cfg.vocab_size, range(args.steps))  # optimizer states exist
        # one more micro batch up to (not through) the step: gradients held
        batches = micro_batches(args.steps, plan, ctx.rank, model_cfg.vocab_size)
        n_global = float(all_reduce_sum([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)])[0])
        for b in batches:
            loss = token_loss_sum(strategy.forward(b["input_ids"], b["attention_mask"]).logits, b["labels"])
            strategy.backward(loss / n_global)
            del loss
        gc.collect()
        after_backward = tensor_bytes(strategy_module(strategy)) - base
        strategy.step(args.steps)
        gc.collect()
        after_step = tensor_bytes(strategy_module(strategy)) - base
        breakdown = memory_breakdown(strategy)
        results[backend] = {"n_params": n_params, "after_backward": after_backward, "after_step": after_step,
                            "bucket_elems": args.bucket, **breakdown,
                            "functional_linear_is_torch": F.linear is TORCH_LINEAR}
        strategy = breakdown = None
        gc.collect()
    all_results = [None] * ctx.world_size
    if ctx.world_size > 1:
        dist.all_gather_object(all_results, results)
    else:
        all_results = [results]
    if ctx.rank == 0:
        (out / "memory.json").write_text(json.dumps(all_results, indent=1))
        print(json.dumps(all_results, indent=1), flush=True)


def strategy_module(strategy):
    return getattr(strategy, "module", None) or strategy.model


def _nbytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def memory_breakdown(strategy) -> dict:
    """Bytes by category from the backend's own structures (a cross-check of the census)."""
    module = strategy_module(strategy)
    if strategy.name in ("zero2", "zero3"):
        base = strategy._base
        flats = [f for f, _ in strategy._flat_partitions()]
        opt_state = [v for f in flats for v in base.state.get(f, {}).values() if isinstance(v, torch.Tensor) and v.numel() > 1]
        if strategy.name == "zero3":
            working = [p.ds_tensor for p in module.parameters()]
        else:
            working = [p for p in module.parameters()]
        return {"working_params": _nbytes(working), "fp32_master": _nbytes(flats), "optimizer_states": _nbytes(opt_state)}
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    params = [local(p) for p in module.parameters()]
    opt_state = [local(v) for st in strategy.optimizer.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor) and v.numel() > 1]
    return {"working_params": _nbytes(params), "fp32_master": 0, "optimizer_states": _nbytes(opt_state)}


# -- build RSS ----------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_peak(fn) -> tuple[int, object]:
    """(peak RSS growth in bytes while fn runs, fn's result): VmHWM reset via clear_refs."""
    _trim()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = fn()
    return (_status_kb("VmHWM") - before) * 1024, result


def mode_build(args, ctx) -> None:
    from fft_dist.strategy import device_defaults
    from fft_dist.model import build_model
    from fft_dist.strategy.deepspeed import DeepSpeedStrategy

    model_cfg = tiny_config(scale=args.scale, vocab=args.vocab, layers=args.layers, intermediate=args.intermediate)
    cfg = make_cfg("zero3", micro=1, global_batch=ctx.world_size, steps=1)
    plan = batch_plan(cfg.train, ctx.world_size)
    strategy = DeepSpeedStrategy(cfg, plan, ctx, device_defaults(cfg, ctx.device))
    # warm-up: import the modeling code and touch every code path once, outside the measurement
    warm = strategy.build_partitioned(lambda: build_model(tiny_config()))
    warm = build_model(tiny_config())
    del warm

    def zero3_build():
        torch.manual_seed(SEED)
        return strategy.build_partitioned(lambda: build_model(model_cfg))

    peak_z3, model = measure_peak(zero3_build)
    n_params = sum(p.ds_numel for p in model.parameters())
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    del model
    gc.collect()
    _trim()
    dist.barrier()

    def plain_build():
        torch.manual_seed(SEED)
        return build_model(model_cfg)

    peak_plain, model = measure_peak(plain_build)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {"rank": ctx.rank, "n_params": n_params, "full_bytes": full_bytes, "zero3_partition_bytes": held,
           "peak_rss_growth_zero3": peak_z3, "peak_rss_growth_plain": peak_plain}
    rows = [None] * ctx.world_size
    dist.all_gather_object(rows, row)
    if ctx.rank == 0:
        (Path(args.out) / "build.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows, indent=1), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["memory", "build"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", nargs="+", default=["zero2", "zero3"], help="memory: the backends to measure")
    ap.add_argument("--scale", type=int, default=1, help="hidden size = 64 x scale")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--bucket", type=int, default=2_000_000, help="memory: DeepSpeed bucket sizes (elements)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers")
    ap.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 128 x scale)")
    ap.add_argument("--steps", type=int, default=2, help="memory: optimizer steps before measuring")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = init_distributed("gloo", 300)
    try:
        {"memory": mode_memory, "build": mode_build}[args.mode](args, ctx)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from fft_dist.dist import exit_rank

    exit_rank(0)  # skip finalisation: torch 2.13's gloo can abort there (see exit_rank)
