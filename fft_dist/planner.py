"""`fft-dist plan`: the cheapest set-up that fits a GPU budget, from :mod:`fft_dist.memory` (pure).

Candidates keep the global batch: micro batch m on N GPUs with accumulation
global / (m N). They are ranked by this key, cheapest first:
1. no offload before offload (the optimizer step on the CPU and the PCIe copies cost most);
2. no activation checkpointing before checkpointing (recomputing forward costs ~1/3 more compute);
3. less communication per optimizer step, in units of Ψ elements, from each backend's descriptor:
   none 0; zero2 one reduce-scatter per micro step plus one all-gather per step (accum + 1); fsdp
   and zero3 an all-gather in forward, another in backward and a reduce-scatter per micro step
   (3 accum); hsdp, considered when the config chooses it, fsdp's plus one all-reduce (3 accum + 1);
4. the larger micro batch (fewer, fuller kernels);
5. the larger eval micro batch (eval.micro_batch_size halved until it fits: eval is a small share
   of the time, and its logits can be the activation peak at a 128k vocabulary).
A set-up fits when its per-GPU total is within :func:`fft_dist.memory.limit`: the budget (90% of the
GPU) less the headroom (10% of the budget by default, `--headroom`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fft_dist.config import FFTConfig
from fft_dist.memory import (
    GIB, HEADROOM, KEPT, USABLE, ModelShape, Setup, budget, configured_shard_size, estimate, fits, limit, runs_eval,
)
from fft_dist.strategy import backend as registry


class NoFit(Exception):
    """No candidate fits (or the global batch cannot be split over the GPUs)."""


@dataclass(frozen=True)
class Choice:
    row: dict[str, Any]
    grad_accum: int
    global_batch: int
    reasons: tuple[str, ...]
    overrides: tuple[str, ...]
    checkpointing_overrides: tuple[str, ...] = ()
    """The same set-up with activation checkpointing on, when activations dominate it (else empty)."""


def comm_volume(backend: str, grad_accum: int) -> int:
    """Elements moved per optimizer step, in units of Ψ (the ranking key's third part): the descriptor's."""
    return registry.row_backend(backend).comm_volume(grad_accum)


def candidates(cfg: FFTConfig, gpus: int) -> list[tuple[tuple, Setup, int]]:
    """(ranking key, set-up, accumulation) for every set-up that keeps the global batch."""
    global_batch = cfg.train.global_batch_size
    micros = [m for m in range(cfg.train.micro_batch_size, 0, -1) if global_batch % (m * gpus) == 0]
    if not micros:
        raise NoFit(f"train.global_batch_size={global_batch} cannot be split over {gpus} GPUs (it must be a "
                    f"multiple of {gpus}); set train.global_batch_size to a multiple of {gpus}")
    evals = eval_batches(cfg)
    out = []
    for offload, names in ((False, plan_rows(cfg, gpus, offload=False)), (True, plan_rows(cfg, gpus, offload=True))):
        for checkpointing in (False, True):
            for backend in names:
                shard = configured_shard_size(cfg, backend, gpus) or 0
                for m in micros:
                    accum = global_batch // (m * gpus)
                    for e in evals:
                        key = (offload, checkpointing, comm_volume(backend, accum), -m, -e)
                        out.append((key, Setup(backend, gpus, m, cfg.data.max_length, checkpointing, e, shard), accum))
    return sorted(out, key=lambda c: c[0])


def plan_rows(cfg: FFTConfig, gpus: int, *, offload: bool) -> list[str]:
    """The descriptors' listed rows (on the GPU, or offloaded), plus the configured backend when it lists
    none of its own (hsdp) and can run on `gpus`."""
    offloaded = {r.name for b in registry.backends() for r in b.rows if r.offload}
    names = [n for n in registry.listed_rows(gpus=gpus, plan=True) if (n in offloaded) == offload]
    chosen = registry.get(cfg.parallelism.name)
    if (not offload and not chosen.rows and chosen.single_process == (gpus == 1)
            and (chosen.group_size is None or chosen.group_size(cfg, gpus) is not None)):
        names.append(chosen.name)
    return names


def eval_batches(cfg: FFTConfig) -> list[int]:
    """eval.micro_batch_size, then halved down to 1 ([0]: the run has no eval set)."""
    if not runs_eval(cfg):
        return [0]
    out = [cfg.eval.micro_batch_size]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def budget_text(gpu_mem: int, headroom: float) -> str:
    return (f"{limit(gpu_mem, headroom) / GIB:.1f} GiB ({1 - headroom:.0%} of the {budget(gpu_mem) / GIB:.1f} GiB budget, "
            f"which is {USABLE:.0%} of {gpu_mem / GIB:.1f} GiB; --headroom {headroom:.0%})")


def dominated_by_activations(row: dict[str, Any], with_checkpointing: dict[str, Any]) -> bool:
    """Checkpointing is off, training's saved activations are more than half of the set-up's memory,
    and checkpointing would shrink it (not when eval's forward is the activation peak)."""
    total = row["per_gpu_bytes"]["total"]
    return (not row["activation_checkpointing"] and 2 * row["train_activations"] > total
            and with_checkpointing["per_gpu_bytes"]["total"] < total)


def best_plan(cfg: FFTConfig, shape: ModelShape, *, gpus: int, gpu_mem: int, headroom: float = HEADROOM) -> Choice:
    """The first candidate (cheapest) whose per-GPU total fits within :func:`fft_dist.memory.limit`."""
    rows = [(key, setup, accum, estimate(shape, cfg, setup)) for key, setup, accum in candidates(cfg, gpus)]
    for key, setup, accum, row in rows:
        if fits(row, gpu_mem, headroom=headroom):
            reasons = _reasons(cfg, shape, rows, row, accum, gpu_mem, headroom)
            alt: list[str] = []
            with_ac = estimate(shape, cfg, dataclasses.replace(setup, checkpointing=True))
            if dominated_by_activations(row, with_ac):
                reasons.append(f"recommended: activation checkpointing. Training's activations are "
                               f"{row['train_activations'] / GIB:.1f} of the {row['per_gpu_bytes']['total'] / GIB:.1f} GiB, "
                               f"the part the estimate is least sure of; with model.activation_checkpointing=true this "
                               f"set-up needs {with_ac['per_gpu_bytes']['total'] / GIB:.1f} GiB, for about 1/3 more compute.")
                alt = _overrides(cfg, dataclasses.replace(setup, checkpointing=True))
            return Choice(row, accum, cfg.train.global_batch_size, tuple(reasons), tuple(_overrides(cfg, setup)),
                          tuple(alt))
    smallest = min(rows, key=lambda r: r[3]["per_gpu_bytes"]["total"])[3]
    raise NoFit(f"nothing fits in {budget_text(gpu_mem, headroom)} per GPU on {gpus} GPU(s); the smallest "
                f"set-up ({smallest['parallelism']}, micro batch {smallest['micro_batch_size']}, activation checkpointing "
                f"{'on' if smallest['activation_checkpointing'] else 'off'}) needs {smallest['per_gpu_bytes']['total'] / GIB:.1f} GiB. Use more GPUs, a shorter "
                f"data.max_length or a smaller model")


def _reasons(cfg: FFTConfig, shape: ModelShape, rows, chosen: dict[str, Any], accum: int, gpu_mem: int,
             headroom: float) -> list[str]:
    b = chosen["per_gpu_bytes"]
    peak = "eval's forward" if chosen["eval_activations"] > chosen["train_activations"] else "training"
    out = [f"{shape.params / 1e9:.2f}B parameters; {chosen['parallelism']} needs {b['total'] / GIB:.1f} GiB per GPU "
           f"(params {b['params'] / GIB:.1f}, grads {b['grads'] / GIB:.1f}, master {b['master'] / GIB:.1f}, optimizer "
           f"{b['optimizer'] / GIB:.1f}, activations {b['activations'] / GIB:.1f} (the larger of training "
           f"{chosen['train_activations'] / GIB:.1f} and eval {chosen['eval_activations'] / GIB:.1f}: {peak}), buffers "
           f"{b['buffers'] / GIB:.1f}): {b['total'] / budget(gpu_mem):.0%} of the budget, within "
           f"{budget_text(gpu_mem, headroom)}."]
    out += _kept_reason(chosen)
    cheaper: dict[tuple, tuple[Setup, dict[str, Any]]] = {}  # a training set-up's smallest eval batch tried
    for _, setup, _, row in rows[: next(i for i, r in enumerate(rows) if r[3] is chosen)]:
        cheaper[(setup.parallelism, setup.micro_batch, setup.checkpointing)] = (setup, row)
    cheaper.pop((chosen["parallelism"], chosen["micro_batch_size"], chosen["activation_checkpointing"]), None)
    for setup, row in list(cheaper.values())[:3]:  # the cheapest ones that did not fit, and by how much
        out.append(f"cheaper but too big: {setup.parallelism}, micro batch {setup.micro_batch}, checkpointing "
                   f"{'on' if setup.checkpointing else 'off'}: {row['per_gpu_bytes']['total'] / GIB:.1f} GiB per GPU"
                   + (f" (eval micro batch {setup.eval_micro_batch})." if setup.eval_micro_batch else "."))
    if len(cheaper) > 3:
        out.append(f"({len(cheaper) - 3} more cheaper set-ups do not fit either; `fft-dist estimate` shows them all.)")
    out.append(f"micro batch {chosen['micro_batch_size']} x accumulation {accum} x {chosen['gpus']} GPU(s) keeps the "
               f"global batch of {cfg.train.global_batch_size}.")
    if chosen["eval_micro_batch_size"] and chosen["eval_micro_batch_size"] < cfg.eval.micro_batch_size:
        out.append(f"eval.micro_batch_size {cfg.eval.micro_batch_size} -> {chosen['eval_micro_batch_size']}: with "
                   f"{cfg.eval.micro_batch_size}, eval's forward would not fit (the eval loss is the same, eval takes longer).")
    acts = chosen["activations_by_checkpointing"]
    if chosen["activation_checkpointing"]:
        out.append(f"activation checkpointing cuts activations from {acts['off'] / GIB:.1f} to {acts['on'] / GIB:.1f} GiB "
                   "for about 1/3 more compute.")
    if chosen["cpu_bytes_per_gpu"]:
        out.append(f"offload needs {chosen['cpu_bytes_per_gpu'] / GIB:.1f} GiB of CPU memory per GPU "
                   f"({chosen['cpu_bytes_per_gpu'] * chosen['gpus'] / GIB:.1f} GiB in all).")
    return out


def _kept_reason(chosen: dict[str, Any]) -> list[str]:
    """What loss.kd / loss.l2sp keep beside the model, named (they are in the total)."""
    b = chosen["per_gpu_bytes"]
    kept = [f"{name} {b[key] / GIB:.2f} GiB" for key, name in KEPT.items() if key in b]
    return [f"the total includes {', '.join(kept)} per GPU."] if kept else []


def _overrides(cfg: FFTConfig, setup: Setup) -> list[str]:
    extra = registry.row_backend(setup.parallelism).overrides
    out = [f"parallelism={setup.parallelism}", *(extra(setup) if extra else []), f"launcher.nproc_per_node={setup.gpus}",
           f"train.micro_batch_size={setup.micro_batch}", f"train.global_batch_size={cfg.train.global_batch_size}",
           f"model.activation_checkpointing={'true' if setup.checkpointing else 'false'}"]
    if setup.eval_micro_batch and setup.eval_micro_batch != cfg.eval.micro_batch_size:
        out.append(f"eval.micro_batch_size={setup.eval_micro_batch}")
    return out


def format_plan(choice: Choice) -> str:
    """The plan, its reasons, then the overrides to paste (last line: scripts read it)."""
    lines = [f"plan: {choice.row['parallelism']} on {choice.row['gpus']} GPU(s)"]
    lines += [f"  - {r}" for r in choice.reasons]
    if choice.checkpointing_overrides:
        lines.append("with activation checkpointing (recommended):")
        lines.append("  " + " ".join(choice.checkpointing_overrides))
    lines.append("overrides:")
    lines.append("  " + " ".join(choice.overrides))
    return "\n".join(lines)
