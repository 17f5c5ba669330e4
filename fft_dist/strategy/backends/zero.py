"""parallelism=zero2 / zero3 (and their _offload groups): DeepSpeed ZeRO (the class:
fft_dist.strategy.deepspeed; every DeepSpeed rule: fft_dist.strategy.deepspeed_config)."""
from __future__ import annotations

import dataclasses

from fft_dist.config import Parallelism, ParallelismConfig
from fft_dist.strategy.backend import Backend, Row, register
from fft_dist.strategy.deepspeed_config import bucket_sizes, check_deepspeed
from fft_dist.strategy.sizing import StateBytes, native_16bit, optimizer_bytes_per_param

STRATEGY = "fft_dist.strategy.deepspeed:DeepSpeedStrategy"
OPTIONS = ("offload_optimizer", "overlap_comm", "bf16_weights", "contiguous_gradients", "reduce_bucket_size",
           "allgather_bucket_size", "deepspeed_overrides")


def memory(shape, cfg, setup) -> StateBytes:
    """Sharded fp32 master, gradients and optimizer states; ZeRO-2 keeps whole working weights, ZeRO-3
    shards them too (but for the persistent small ones); _offload moves the sharded states to CPU memory."""
    backend, n = setup.parallelism, setup.gpus
    psi, t, k = shape.params, shape.trainable, optimizer_bytes_per_param(cfg)
    w = 2 if native_16bit(cfg, backend) else 4
    detail: dict[str, int] = {}
    buckets = bucket_sizes(deepspeed_parallelism(cfg.parallelism, backend), hidden_size=shape.hidden, on_gpu=True)
    detail["reduce_bucket"] = buckets["reduce_bucket_size"] * w
    master = 4 * t // n
    # 16-bit modes also make an fp32 copy of the gradient partition for the optimizer step
    grads = w * t // n + (4 * t // n if w == 2 else 0)
    optim = k * t // n
    cpu = 0
    if backend.startswith("zero2"):
        # ZeRO-2's gradient buffer on a rank runs to whole parameters at its partition's ends: measured
        # at 4 ranks, half the largest parameter more on average (up to twice that on a middle rank)
        straddle = max(shape.param_sizes, default=0) // 2
        grads += w * (min(t, t // n + straddle) - t // n)
        params = w * psi
        # a limit on what is gathered at once (into the weights' own buffer), so never more than the model
        detail["allgather_bucket"] = min(buckets["allgather_bucket_size"], psi) * w
    else:
        threshold = buckets["param_persistence_threshold"]
        persistent = sum(s for s in shape.param_sizes if s <= threshold)  # DeepSpeed: ds_numel <= threshold
        params = w * ((psi - persistent) // n + persistent)
        detail["persistent_params"] = persistent
        detail["prefetch_bucket"] = min(buckets["prefetch_bucket_size"], psi) * w  # in flight, at most the model
        detail["gathered_layers"] = shape.largest_module * 2 * w  # its weights and their gradients
    if backend.endswith("_offload"):  # reduced gradients go straight into an fp32 partition in CPU memory
        cpu = master + 4 * t // n + optim
        master = grads = optim = 0
        if backend == "zero3_offload":
            cpu += params - w * detail["persistent_params"]
            params = w * detail["persistent_params"]
    return StateBytes(params=params, grads=grads, master=master, optim=optim, detail=detail, cpu=cpu)


def deepspeed_parallelism(par: ParallelismConfig, backend: str) -> ParallelismConfig:
    """The configured bucket fields when the config is a DeepSpeed one, else auto."""
    if Parallelism(par.name) in (Parallelism.zero2, Parallelism.zero3):
        return par
    return dataclasses.replace(ParallelismConfig(), name=Parallelism(backend.split("_")[0]))


ZERO2 = register(Backend(
    name="zero2", strategy=STRATEGY, check=check_deepspeed, memory=memory, deepspeed_stage=2,
    # one reduce-scatter per micro step plus one all-gather per step
    comm_volume=lambda grad_accum: grad_accum + 1,
    options=OPTIONS, rows=(Row("zero2"), Row("zero2_offload", offload=True)),
    notes={"reshard_after_forward": "ZeRO-2 keeps whole weights on every rank",
           "offload_params": "ZeRO-2 keeps whole weights on every GPU; use parallelism=zero3_offload"},
))
ZERO3 = register(Backend(
    name="zero3", strategy=STRATEGY, check=check_deepspeed, memory=memory, deepspeed_stage=3,
    # an all-gather in forward, another in backward and a reduce-scatter per micro step
    comm_volume=lambda grad_accum: 3 * grad_accum,
    options=OPTIONS + ("offload_params", "prefetch_bucket_size", "param_persistence_threshold"),
    notes={"reshard_after_forward": "ZeRO-3 always re-partitions after forward"},
    rows=(Row("zero3"), Row("zero3_offload", offload=True)),
))
