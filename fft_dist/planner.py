"""`fft-dist plan`: the cheapest set-up that fits a GPU budget, from :mod:`fft_dist.memory` (pure).

Candidates keep the global batch: micro batch m on N GPUs with accumulation
global / (m N). They are ranked by this key, cheapest first:
1. no offload before offload (the optimizer step on the CPU and the PCIe copies cost most);
2. no activation checkpointing before checkpointing (recomputing forward costs ~1/3 more compute);
3. less communication per optimizer step, in units of Ψ elements: none 0; zero2 one
   reduce-scatter per micro step plus one all-gather per step (accum + 1); fsdp and zero3 an
   all-gather in forward, another in backward and a reduce-scatter per micro step (3 accum);
4. the larger micro batch (fewer, fuller kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fft_dist.config import FFTConfig
from fft_dist.memory import GIB, ModelShape, Setup, estimate, fits

HEADROOM = 0.9


class NoFit(Exception):
    """No candidate fits (or the global batch cannot be split over the GPUs)."""


@dataclass(frozen=True)
class Choice:
    row: dict[str, Any]
    grad_accum: int
    global_batch: int
    reasons: tuple[str, ...]
    overrides: tuple[str, ...]


def comm_volume(backend: str, grad_accum: int) -> int:
    """Elements moved per optimizer step, in units of Ψ (the ranking key's third part)."""
    if backend == "none":
        return 0
    if backend.startswith("zero2"):
        return grad_accum + 1
    return 3 * grad_accum


def candidates(cfg: FFTConfig, gpus: int) -> list[tuple[tuple, Setup, int]]:
    """(ranking key, set-up, accumulation) for every set-up that keeps the global batch."""
    global_batch = cfg.train.global_batch_size
    micros = [m for m in range(cfg.train.micro_batch_size, 0, -1) if global_batch % (m * gpus) == 0]
    if not micros:
        raise NoFit(f"train.global_batch_size={global_batch} cannot be split over {gpus} GPUs (it must be a "
                    f"multiple of {gpus}); set train.global_batch_size to a multiple of {gpus}")
    backends = ("none",) if gpus == 1 else ("zero2", "fsdp", "zero3")
    out = []
    for offload, names in ((False, backends), (True, ("zero2_offload", "zero3_offload"))):
        for checkpointing in (False, True):
            for backend in names:
                for m in micros:
                    accum = global_batch // (m * gpus)
                    key = (offload, checkpointing, comm_volume(backend, accum), -m)
                    out.append((key, Setup(backend, gpus, m, cfg.data.max_length, checkpointing), accum))
    return sorted(out, key=lambda c: c[0])


def best_plan(cfg: FFTConfig, shape: ModelShape, *, gpus: int, gpu_mem: int) -> Choice:
    """The first candidate (cheapest) whose per-GPU total fits in HEADROOM of ``gpu_mem``."""
    rows = [(key, setup, accum, estimate(shape, cfg, setup)) for key, setup, accum in candidates(cfg, gpus)]
    for key, setup, accum, row in rows:
        if fits(row, gpu_mem, headroom=HEADROOM):
            return Choice(row, accum, cfg.train.global_batch_size, tuple(_reasons(cfg, shape, rows, row, accum, gpu_mem)),
                          tuple(_overrides(cfg, setup)))
    smallest = min(rows, key=lambda r: r[3]["per_gpu_bytes"]["total"])[3]
    raise NoFit(f"nothing fits in {HEADROOM:.0%} of {gpu_mem / GIB:.1f} GiB per GPU on {gpus} GPU(s); the smallest "
                f"set-up ({smallest['parallelism']}, micro batch {smallest['micro_batch_size']}, activation checkpointing "
                f"{'on' if smallest['activation_checkpointing'] else 'off'}) needs {smallest['per_gpu_bytes']['total'] / GIB:.1f} GiB. Use more GPUs, a shorter "
                f"data.max_length or a smaller model")


def _reasons(cfg: FFTConfig, shape: ModelShape, rows, chosen: dict[str, Any], accum: int, gpu_mem: int) -> list[str]:
    b = chosen["per_gpu_bytes"]
    out = [f"{shape.params / 1e9:.2f}B parameters; {chosen['parallelism']} needs {b['total'] / GIB:.1f} GiB per GPU "
           f"(params {b['params'] / GIB:.1f}, grads {b['grads'] / GIB:.1f}, master {b['master'] / GIB:.1f}, optimizer "
           f"{b['optimizer'] / GIB:.1f}, activations {b['activations'] / GIB:.1f}, buffers {b['buffers'] / GIB:.1f}), "
           f"within {HEADROOM:.0%} of {gpu_mem / GIB:.1f} GiB."]
    cheaper = [(setup, row) for _, setup, _, row in rows[: next(i for i, r in enumerate(rows) if r[3] is chosen)]]
    for setup, row in cheaper[:3]:  # the cheapest ones that did not fit, and by how much
        out.append(f"cheaper but too big: {setup.parallelism}, micro batch {setup.micro_batch}, checkpointing "
                   f"{'on' if setup.checkpointing else 'off'}: {row['per_gpu_bytes']['total'] / GIB:.1f} GiB per GPU.")
    if len(cheaper) > 3:
        out.append(f"({len(cheaper) - 3} more cheaper set-ups do not fit either; `fft-dist estimate` shows them all.)")
    out.append(f"micro batch {chosen['micro_batch_size']} x accumulation {accum} x {chosen['gpus']} GPU(s) keeps the "
               f"global batch of {cfg.train.global_batch_size}.")
    acts = chosen["activations_by_checkpointing"]
    if chosen["activation_checkpointing"]:
        out.append(f"activation checkpointing cuts activations from {acts['off'] / GIB:.1f} to {acts['on'] / GIB:.1f} GiB "
                   "for about 1/3 more compute.")
    if chosen["cpu_bytes_per_gpu"]:
        out.append(f"offload needs {chosen['cpu_bytes_per_gpu'] / GIB:.1f} GiB of CPU memory per GPU "
                   f"({chosen['cpu_bytes_per_gpu'] * chosen['gpus'] / GIB:.1f} GiB in all).")
    return out


def _overrides(cfg: FFTConfig, setup: Setup) -> list[str]:
    return [f"parallelism={setup.parallelism}", f"launcher.nproc_per_node={setup.gpus}",
            f"train.micro_batch_size={setup.micro_batch}", f"train.global_batch_size={cfg.train.global_batch_size}",
            f"model.activation_checkpointing={'true' if setup.checkpointing else 'false'}"]


def format_plan(choice: Choice, gpu_mem: int) -> str:
    del gpu_mem  # already in the reasons
    lines = [f"plan: {choice.row['parallelism']} on {choice.row['gpus']} GPU(s)"]
    lines += [f"  - {r}" for r in choice.reasons]
    lines.append("overrides:")
    lines.append("  " + " ".join(choice.overrides))
    return "\n".join(lines)
