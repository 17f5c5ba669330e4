"""Process-group setup from the launcher's environment, rank helpers and seeding.

torchrun, the deepspeed launcher and our self-launch all export RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, so one env:// init serves them all. Which launcher
started us, and how, is :mod:`fft_dist.launch`'s business.
"""
from __future__ import annotations

import os
import random
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from fft_dist.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_backend(requested: str) -> None:
    """dist.backend=nccl needs CUDA on the machine the ranks run on (the launcher checks it before
    launch where the ranks run on its own machine; a rank checks it at start)."""
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError("dist.backend=nccl needs CUDA GPUs, and torch sees none on this machine "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use dist.backend=auto "
                          "(nccl on GPUs, gloo on CPU) or dist.backend=gloo")


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistContext:
    """Join the process group (or run as a lone rank 0 when no launcher is present).

    The caller checks the backend first (:func:`check_backend`), where its error is reported.
    """
    default_cuda_alloc_conf(os.environ)
    rank = int(os.environ.get("RANK", "0"))
    backend = pick_backend(backend)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        timeout = timedelta(seconds=timeout_s)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun restarted the group: its store still holds the dead attempt's addresses, and gloo
            # would connect to them. A key prefix per attempt keeps the attempts apart.
            store = dist.PrefixStore(f"/fft-dist/attempt_{attempt}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                timeout=timeout))
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistContext(rank, world_size, local_rank, device, backend)


def exit_rank(code: int) -> None:
    """End a rank's process now, skipping interpreter finalisation.

    torch 2.13's gloo backend can abort a rank at exit ("terminate called without an active
    exception", SIGABRT) when its worker threads are torn down during finalisation, even after a
    barrier and destroy_process_group: seen about once per full test run with 3 ranks on 2 cores.
    The rank's work is done and its files are closed by then, so flush and leave directly.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group exists (a single process, a script)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def collective_device(group=None) -> torch.device:
    """Where a tensor must be for a collective on `group`: the device type its backend serves.

    Under NCCL only CUDA tensors have a backend ("No backend type associated with device type cpu"
    for anything else); gloo serves the CPU. Every tensor collective of fft-dist goes through the
    helpers below, which move the tensor there and back, so a CPU tensor (an RNG state, a count) never
    reaches an NCCL group as it is (tests/test_collectives.py checks that no other module calls one).
    """
    types = [d.type for d in getattr(group or dist.group.WORLD, "_device_types", ())]
    if not types or "cpu" in types:
        return torch.device("cpu")
    return torch.device(types[0])  # "cuda": the current device (set per rank by init_distributed)


def _on(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def broadcast_tensor(tensor: torch.Tensor, src: int = 0, group=None) -> None:
    """Rank `src`'s `tensor` into every rank's `tensor`, in place, wherever it lives. Collective."""
    if rank_world()[1] == 1:
        return
    work = _on(collective_device(group), tensor)
    dist.broadcast(work, src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)


def all_gather_small(obj, group=None):
    """Gather a small object from every rank (pickled, but only between our own ranks)."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * (dist.get_world_size(group) if group is not None else world)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_small(obj, src: int = 0):
    """Rank `src`'s small object on every rank (pickled, but only between our own ranks)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum a small vector of numbers over all ranks, in float64 so token counts stay exact; the result is
    on `device` (default: the collective device), the sum is taken on the collective device."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        work = _on(collective_device(), t)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not t:
            t.copy_(work)
    return t


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (the one place user-facing output comes from)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False


def warn0(msg: str) -> None:
    if is_main():
        print(f"fft-dist: warning: {msg}", file=sys.stderr, flush=True)


def default_cuda_alloc_conf(env: MutableMapping[str, str]) -> None:
    """expandable_segments:True unless the user set the allocator's config: segments grow instead of
    caching fixed blocks, so training's and eval's different batch shapes do not fragment memory
    (issue 17). It must be in the environment before the rank's first CUDA allocation."""
    if torch.version.cuda and not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(env):
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
