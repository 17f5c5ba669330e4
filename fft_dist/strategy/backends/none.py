"""parallelism=none: one process, no sharding; the numerical reference for every backend."""
from __future__ import annotations

from fft_dist.strategy.backend import Backend, Row, register
from fft_dist.strategy.sizing import StateBytes, optimizer_bytes_per_param


def memory(shape, cfg, setup) -> StateBytes:
    """Everything whole on the one GPU: fp32 weights and gradients, k bytes of optimizer state each."""
    del setup
    t = shape.trainable
    return StateBytes(params=4 * shape.params, grads=4 * t, master=0, optim=optimizer_bytes_per_param(cfg) * t)


BACKEND = register(Backend(
    name="none",
    strategy="fft_dist.strategy.single:SingleProcessStrategy",
    memory=memory,
    comm_volume=lambda grad_accum: 0,
    rows=(Row("none"),),
    single_process=True,
))
