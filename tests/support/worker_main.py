"""The common frame of a test worker that every rank runs: start the process group, let each rank
compute its results, gather them, have rank 0 write them as JSON, and leave without torch's
finalisation (torch 2.13's gloo can abort there: see fft_dist.dist.exit_rank)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from fft_dist.dist import exit_rank, init_distributed


def run_ranks(compute: Callable[[Any], Any], out: str | Path, filename: str, *, timeout_s: int = 300,
              echo: bool = False) -> None:
    """`compute(ctx)` on every rank; rank 0 writes the list of every rank's results to `out`/`filename`
    (and prints it with `echo`). Then exits the process with 0."""
    Path(out).mkdir(parents=True, exist_ok=True)
    ctx = init_distributed("gloo", timeout_s)
    try:
        results = compute(ctx)
        rows = [None] * ctx.world_size
        if ctx.world_size > 1:
            dist.all_gather_object(rows, results)
        else:
            rows = [results]
        if ctx.rank == 0:
            (Path(out) / filename).write_text(json.dumps(rows, indent=1))
            if echo:
                print(json.dumps(rows, indent=1), flush=True)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    exit_rank(0)
