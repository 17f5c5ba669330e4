"""Process-group setup from the launcher's environment, rank helpers and seeding.

torchrun, the deepspeed launcher and our self-launch all export RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, so one env:// init serves them all. Which launcher
started us, and how, is :mod:`fft_dist.launch`'s business.
"""
from __future__ import annotations

import os
import random
import sys
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


def warn_cuda_unused(requested: str) -> str | None:
    """A CUDA build of torch that sees no GPU trains on CPU over gloo with dist.backend=auto: say so
    (e.g. a container started without --gpus, a SLURM job without a GPU request)."""
    if requested == "auto" and torch.version.cuda and not torch.cuda.is_available():
        return (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but sees no GPU: training on CPU "
                "over gloo (a container needs launcher.gpus / --gpus, a SLURM job launcher.gpus_per_node)")
    return None


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistContext:
    """Join the process group (or run as a lone rank 0 when no launcher is present).

    The caller checks the backend first (:func:`check_backend`), where its error is reported.
    """
    rank = int(os.environ.get("RANK", "0"))
    warning = warn_cuda_unused(backend)
    if warning and rank == 0:
        print(f"fft-dist: warning: {warning}", file=sys.stderr, flush=True)
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


_BEFORE_EXIT: list = []


def before_exit(fn) -> None:
    """Run `fn` in :func:`exit_rank`, which skips atexit (e.g. removing a lock lease this process holds)."""
    _BEFORE_EXIT.append(fn)


def exit_rank(code: int) -> None:
    """End a rank's process now, skipping interpreter finalisation.

    torch 2.13's gloo backend can abort a rank at exit ("terminate called without an active
    exception", SIGABRT) when its worker threads are torn down during finalisation, even after a
    barrier and destroy_process_group: seen about once per full test run with 3 ranks on 2 cores.
    The rank's work is done and its files are closed by then, so flush and leave directly.
    """
    for fn in _BEFORE_EXIT:
        try:
            fn()
        except Exception:  # noqa: BLE001 - the rank's result stands; a clean-up must not change it
            pass
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


def all_gather_small(obj):
    """Gather a small object from every rank (pickled, but only between our own ranks)."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_small(obj, src: int = 0):
    """Rank `src`'s small object on every rank (pickled, but only between our own ranks)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum a small vector of numbers over all ranks, in float64 so token counts stay exact."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
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
