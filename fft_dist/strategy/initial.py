"""A strategy's initial weights, built once: on rank 0 (seeded, HF's own init) or on meta for model.path.

Every rank building the full fp32 model on the host cost N full copies of host memory per node (8 x
32 GB for an 8B model, issue 17). Rank 0 builds it; the other ranks build on the meta device, allocate
their part on the device and receive rank 0's tensors, so the initial weights are bit-identical to a
single process's. Under model.path nobody builds: the weights are loaded afterwards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fft_dist.dist import broadcast_tensor, rank_world
from fft_dist.models.family import rebuild_buffers


def build_replicated(build_model, device: torch.device, *, meta_init: bool) -> nn.Module:
    """Every rank's full copy of the model on `device` (ZeRO-2 keeps the whole working model on each rank).

    meta_init (weights from model.path next): built on meta, allocated on the device, buffers rebuilt.
    Otherwise rank 0 alone builds on the host and moves it to the device tensor by tensor; the others
    build on meta, allocate on the device and receive every parameter and buffer (collective).
    """
    rank, world = rank_world()
    if not meta_init and world == 1:
        return build_model().to(device)
    if rank == 0 and not meta_init:
        model = build_model().to(device)  # Module.to moves one tensor at a time: the host copy goes as it moves
    else:
        with torch.device("meta"):
            model = build_model()
        to_empty_keeping_ties(model, device)
    if meta_init:
        rebuild_buffers(model)  # rotary frequencies, Gemma's embed_scale: transformers' own init
        return model
    with torch.no_grad():
        for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
            broadcast_tensor(tensor.data, src=0)
    _share_rng_state()
    return model


def to_empty_keeping_ties(model: nn.Module, device: torch.device) -> None:
    """``Module.to_empty`` from meta, with tied parameters (an lm_head tied to the embeddings) still one
    Parameter: torch 2.13 gives each module its own new Parameter when the tensor type changes."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)
    for (first, first_name), *others in places.values():
        for module, name in others:
            module._parameters[name] = first._parameters[first_name]


def _share_rng_state() -> None:
    """Rank 0's generator state after its build on every rank, as if each had built the model itself."""
    state = torch.get_rng_state()  # a CPU tensor: under NCCL it must travel through the GPU
    broadcast_tensor(state, src=0)
    torch.set_rng_state(state)


@torch.no_grad()
def fill_from_rank0(model: torch.nn.Module, full: torch.nn.Module | None, *, local_range, device) -> None:
    """Copy rank 0's full model `full` into every rank's shards of `model` (collective).

    One broadcast per parameter and buffer, in `model`'s order (both were built from the same
    config, so names match); rank 0 frees each full tensor once it is sent, so its peak is the full
    model, as before, and the other ranks' is their shards plus one tensor. The generator state
    after rank 0's build is given to every rank, as if each had built the model itself.
    """
    rank0 = dist.get_rank() == 0
    sources = {**dict(full.named_parameters()), **dict(full.named_buffers())} if rank0 else {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if rank0:
            source = sources.pop(name)
            value = source.detach().to(device)
            source.data = torch.empty(0, dtype=source.dtype)  # free rank 0's full copy as we go
        else:
            value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        broadcast_tensor(value, src=0)
        local, _, start = local_range(tensor)
        local.copy_(value.view(-1)[start:start + local.numel()])
    if rank0 and sources:
        raise RuntimeError(f"rank 0's model has tensors the sharded model lacks: {sorted(sources)[:5]}")
    _share_rng_state()
