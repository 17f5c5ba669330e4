"""parallelism=fsdp: PyTorch FSDP2 over all ranks (the class: fft_dist.strategy.fsdp)."""
from __future__ import annotations

from fft_dist.config import FFTConfig, Precision
from fft_dist.strategy.backend import Backend, Row, register
from fft_dist.strategy.sizing import ModelShape, StateBytes, optimizer_bytes_per_param, planned


# FSDP2's CPUOffloadPolicy moves parameters, gradients and the optimizer step to the CPU all at once; it
# maps onto neither flag alone, and on a CPU-only machine it would change nothing a test could see. Refused
# rather than silently ignored; the DeepSpeed groups do offload.
_OFFLOAD = ("FSDP2 CPU offload is not implemented; parallelism=zero2_offload and zero3_offload offload "
            "with DeepSpeed")
FSDP2_OFFLOAD = {"offload_optimizer": _OFFLOAD, "offload_params": _OFFLOAD}
"""fsdp's and hsdp's word on the DeepSpeed offload options (Backend.notes)."""


def sharded_state(shape: ModelShape, cfg: FFTConfig, n: int, precision: Precision) -> StateBytes:
    """FSDP2 with every tensor sharded over `n` ranks (HSDP: the ranks of one shard group)."""
    psi, t, k = shape.params, shape.trainable, optimizer_bytes_per_param(cfg)
    gathered = 2 if precision != Precision.fp32 else 4  # MixedPrecisionPolicy(param_dtype=bf16/fp16)
    # the root stays gathered between forward and backward; a layer and the prefetched next one are
    # gathered at a time; one layer's unsharded fp32 gradients wait for their reduce-scatter
    detail = {"gathered_layers": (shape.root_params + 2 * shape.largest_layer) * gathered,
              "unsharded_grads": shape.largest_layer * 4}
    return StateBytes(params=4 * psi // n, grads=4 * t // n, master=0, optim=k * t // n, detail=detail)


def memory(shape, cfg, setup) -> StateBytes:
    return sharded_state(shape, cfg, setup.gpus, planned(cfg, setup.parallelism).precision)


BACKEND = register(Backend(
    name="fsdp",
    strategy="fft_dist.strategy.fsdp:FSDPStrategy",
    memory=memory,
    # an all-gather in forward, another in backward and a reduce-scatter per micro step
    comm_volume=lambda grad_accum: 3 * grad_accum,
    options=("reshard_after_forward",),
    notes=FSDP2_OFFLOAD,
    rows=(Row("fsdp"),),
))
