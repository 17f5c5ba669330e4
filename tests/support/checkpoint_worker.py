"""A small sharded Strategy for tests and benchmarks of the checkpoint format (no model code), and its worker.

:class:`FlatShardStrategy` holds named tensors split over ranks the way real backends split
them, and trains them with ``torch.optim.AdamW`` on its local pieces only, like ZeRO does:

- ``rows``    FSDP2: dim 0 in ceil(d0 / W) row chunks;
- ``flat``    ZeRO-3: each flattened tensor in ceil(numel / W) pieces;
- ``group``   ZeRO-2: the concatenation of all tensors in ceil(total / W) pieces, so tensors
              straddle rank boundaries and a rank may own nothing of a tensor;
- ``uneven``  each flattened tensor split in proportion 1 : 2 : ... : W.

Gradients are a fixed function of (tensor, flat element, step), so AdamW (element-wise) gives
the same numbers however the tensors are split: a run resumed at another world size or split
must end where an uninterrupted one does.

Worker: ``python -m torch.distributed.run --nproc_per_node N tests/support/checkpoint_worker.py ...`` (see
``--help``), or ``python tests/support/checkpoint_worker.py ...`` as one process; used by
tests/{unit,e2e}/test_checkpoint*.py. bench/checkpoint.py imports :class:`FlatShardStrategy` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

import torch

from fft_dist.strategy.base import Fragment

SPLITS = ("rows", "flat", "group", "uneven")


def _ranges(shapes: dict[str, tuple[int, ...]], split: str, rank: int, world: int) -> dict[str, tuple[int, int]]:
    out = {}
    if split == "group":
        total = sum(_numel(s) for s in shapes.values())
        chunk = -(-total // world)
        lo, hi = rank * chunk, min((rank + 1) * chunk, total)
        base = 0
        for name, shape in shapes.items():
            n = _numel(shape)
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                out[name] = (a - base, b - base)
            base += n
        return out
    for name, shape in shapes.items():
        n = _numel(shape)
        if split == "rows":
            d0 = shape[0] if shape else 1
            row = n // d0 if d0 else 0
            c = -(-d0 // world)
            a, b = min(rank * c, d0) * row, min((rank + 1) * c, d0) * row
        elif split == "flat":
            c = -(-n // world)
            a, b = min(rank * c, n), min((rank + 1) * c, n)
        elif split == "uneven":
            tot = world * (world + 1) // 2
            a, b = n * (rank * (rank + 1) // 2) // tot, n * ((rank + 1) * (rank + 2) // 2) // tot
        else:
            raise ValueError(f"split {split!r}: choose one of {SPLITS}")
        if a < b:
            out[name] = (a, b)
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _name_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def init_values(name: str, shape, a: int, b: int, seed: int) -> torch.Tensor:
    """Elements [a, b) of a deterministic N(0, 0.02) init of tensor `name` (same for any split)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + _name_seed(name))
    # chunked generation keeps any split consistent without materialising the full tensor
    out = torch.empty(b - a)
    block = 1 << 16
    first, last = a // block, (b - 1) // block if b > a else a // block - 1
    pos = 0
    for blk in range(first, last + 1):
        gb = torch.Generator().manual_seed(g.initial_seed() + blk)
        vals = torch.randn(block, generator=gb) * 0.02
        lo = max(a, blk * block) - blk * block
        hi = min(b, (blk + 1) * block) - blk * block
        out[pos : pos + hi - lo] = vals[lo:hi]
        pos += hi - lo
    return out


def synthetic_grad(name: str, a: int, b: int, step: int) -> torch.Tensor:
    idx = torch.arange(a, b, dtype=torch.float64)
    phase = (_name_seed(name) % 1000) / 1000.0
    return (torch.sin(idx * 0.0137 + 0.7 * step + phase) * 0.1).to(torch.float32)


class FlatShardStrategy:
    name = "flatshard"

    def __init__(self, shapes: dict[str, tuple[int, ...]], *, split: str, rank: int, world: int, seed: int = 0,
                 lr: float = 1e-2, frozen: tuple[str, ...] = ()):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.split, self.rank, self.world = split, rank, world
        self.ranges = _ranges(self.shapes, split, rank, world)
        self.frozen = set(frozen)
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, (a, b) in self.ranges.items():
            p = torch.nn.Parameter(init_values(name, self.shapes[name], a, b, seed))
            p.requires_grad_(name not in self.frozen)
            self.params[name] = p
        trainable = [p for n, p in self.params.items() if n not in self.frozen]
        self.optimizer = torch.optim.AdamW(trainable or [torch.nn.Parameter(torch.zeros(0))], lr=lr,
                                           weight_decay=0.01)

    def train_step(self, step: int) -> None:
        for name, p in self.params.items():
            if p.requires_grad:
                a, b = self.ranges[name]
                p.grad = synthetic_grad(name, a, b, step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _ensure_state(self) -> None:
        if all(self.optimizer.state.get(p) for p in self.params.values() if p.requires_grad):
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.param_groups[0]["lr"] = 0.0
        for p in self.params.values():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.param_groups[0]["lr"] = lr

    def fragments(self):
        with torch.no_grad():
            for name, p in self.params.items():
                a, _ = self.ranges[name]
                shape = self.shapes[name]
                yield Fragment(name, "param", shape, a, p.data)
                for kind, v in self.optimizer.state.get(p, {}).items():
                    if kind == "step":
                        if a == 0:
                            yield Fragment(name, "step", (1,), 0, v.reshape(1))
                        continue
                    yield Fragment(name, kind, shape, a, v)

    def load_fragments(self, source) -> None:
        first = next(iter(self.params), None)
        if first is not None and any(source.has(first, k) for k in ("exp_avg", "exp_avg_sq", "step")):
            self._ensure_state()  # a pretrained HF folder has parameters only: keep the optimizer fresh
        with torch.no_grad():
            for name, p in self.params.items():
                a, b = self.ranges[name]
                p.data.copy_(source.read(name, "param", a, b))
                for kind, v in self.optimizer.state.get(p, {}).items():
                    if not source.has(name, kind):
                        continue
                    if kind == "step":
                        v.copy_(source.read(name, "step", 0, 1).reshape(v.shape))
                    else:
                        v.copy_(source.read(name, kind, a, b))

    def state_bytes(self) -> int:
        return sum(f.local.numel() * f.local.element_size() for f in self.fragments())


def llama_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of an HF causal LM built from `config` on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# -- the worker ------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tests/support/checkpoint_worker.py")
    p.add_argument("--spec", required=True, help="JSON: {'tensors': [[name, shape], ...], 'model_config': {...}}")
    p.add_argument("--ckpt-root", required=True)
    p.add_argument("--split", default="rows", choices=SPLITS)
    p.add_argument("--steps", type=int, default=0, help="train until this step")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--resume", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="rank r writes {out}.rank{r}.json")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--protect", default="", help="comma-separated step folders that pruning must keep")
    p.add_argument("--async-save", action="store_true", help="one Checkpointer with asynchronous saves (issue 21)")
    p.add_argument("--nan-at", type=int, default=0, help="make one parameter element NaN before saving this step")
    return p.parse_args(argv)


RUN_ID = "fedcba9876543210"
"""Every save of this worker belongs to one run (so keep_last prunes across its restarts)."""


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from fft_dist import checkpoint as ckpt

    args = _parse(sys.argv[1:] if argv is None else argv)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    import random

    import numpy as np

    torch.manual_seed(1000 + rank)  # distinct per-rank RNG streams, so the test sees whose state came back
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    spec = json.loads(Path(args.spec).read_text())
    shapes = {n: tuple(s) for n, s in spec["tensors"]}
    strategy = FlatShardStrategy(shapes, split=args.split, rank=rank, world=world, seed=args.seed,
                                 frozen=tuple(spec.get("frozen", ())))
    result: dict = {"rank": rank, "world": world}
    root = Path(args.ckpt_root)
    try:
        step = 0
        path = ckpt.find_resume(args.resume, root)
        if path is not None:
            state = ckpt.load_checkpoint(strategy, path, verify=not args.no_verify)
            step = state["step"]
            result["resumed_from"] = str(path)
            result["rand_after_resume"] = [torch.rand(3).tolist(), random.random(), float(np.random.rand())]
        meta = {"model_config": spec.get("model_config"), "backend": f"flatshard-{args.split}",
                "config_yaml": "test: true\n", "tokenizer_dir": spec.get("tokenizer_dir")}
        protect = [p for p in args.protect.split(",") if p]
        saver = ckpt.Checkpointer(root, run_id=RUN_ID, keep_last=args.keep_last, async_save=True) \
            if args.async_save else None
        while step < args.steps:
            strategy.train_step(step)
            step += 1
            if step == args.nan_at and strategy.params:
                next(iter(strategy.params.values())).data.view(-1)[-1] = float("nan")
            if args.save_every and step % args.save_every == 0 or step == args.steps:
                state = {"step": step, "tokens_seen": 100 * step}
                if saver is not None:  # training goes on at once, mutating what the save staged a copy of
                    saver.save(strategy, step, state, meta=meta, protect=protect)
                else:
                    ckpt.save_checkpoint(strategy, ckpt_root=root, step=step, keep_last=args.keep_last,
                                         train_state=state, meta=meta, protect=protect, run_id=RUN_ID)
                result.setdefault("saved", []).append(step)
                result.setdefault("rand_after_save", {})[str(step)] = [torch.rand(3).tolist(), random.random(),
                                                                        float(np.random.rand())]
        if saver is not None:
            saver.close()
    except ckpt.CheckpointError as e:
        result["error"] = str(e)
    if args.out:
        Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()  # nothing in flight when the group goes away (gloo can abort otherwise)
        dist.destroy_process_group()
    return 1 if "error" in result else 0


if __name__ == "__main__":
    from fft_dist.dist import exit_rank

    exit_rank(main())  # skip finalisation: torch 2.13's gloo can abort there (see exit_rank)
