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
    timeout_s: int = 600
    """The collective timeout in force (dist.timeout_s, auto resolved on this rank)."""

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


CPU_TIMEOUT_S = 600
GPU_TIMEOUT_S = 1800
"""dist.timeout_s=auto on GPUs: a large model's first save (every rank writes its shards, rank 0 the
manifest, then all wait) or a slow shared file system outlasts CPU's 600 s; a hung NCCL rank still
fails the job within half an hour (the data cache build waits on its own group, for hours)."""


def describe_timeout(setting: str | int, ctx: DistContext) -> str:
    """The line that says which collective timeout a run has, and why (rank 0 prints it)."""
    why = f"auto: the {'GPU' if ctx.backend == 'nccl' else 'CPU'} default" if str(setting) == "auto" else "set"
    return f"{ctx.backend} process group of {ctx.world_size} rank(s), collective timeout {ctx.timeout_s} s (dist.timeout_s {why})"


def timeout_seconds(value: str | int, backend: str) -> int:
    """dist.timeout_s as seconds: a number, or auto (:data:`GPU_TIMEOUT_S` on nccl, else :data:`CPU_TIMEOUT_S`)."""
    if str(value) == "auto":
        return GPU_TIMEOUT_S if backend == "nccl" else CPU_TIMEOUT_S
    return int(value)


def gloo_ifname_from_nccl(nccl: str, interfaces: list[str]) -> str | None:
    """GLOO_SOCKET_IFNAME for an NCCL_SOCKET_IFNAME value: NCCL matches name prefixes (``eth`` is eth0,
    eth1), gloo wants exact names, so the prefixes are matched against this node's interfaces. None
    for an exclusion list (``^docker,lo``) or when nothing matches: gloo then picks as before."""
    if not nccl or nccl.startswith("^"):
        return None
    exact = nccl.startswith("=")
    wanted = [w.strip() for w in nccl.lstrip("=").split(",") if w.strip()]
    names = [i for w in wanted for i in interfaces if (i == w if exact else i.startswith(w))]
    return ",".join(dict.fromkeys(names)) or None  # in the user's order, each once


def network_env(backend: str) -> None:
    """Set what the user did not: GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME (GPU runs open gloo groups
    too, for the data cache and small objects; on a multi-homed node gloo may pick an interface the other
    nodes cannot reach, and hang), and NCCL's async error handling (a failed collective ends the job)."""
    nccl = os.environ.get("NCCL_SOCKET_IFNAME", "")
    if nccl and not os.environ.get("GLOO_SOCKET_IFNAME"):
        import socket

        gloo = gloo_ifname_from_nccl(nccl, [name for _, name in socket.if_nameindex()])
        if gloo:
            os.environ["GLOO_SOCKET_IFNAME"] = gloo
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


def warn_cuda_unused(requested: str) -> str | None:
    """A CUDA build of torch that sees no GPU trains on CPU over gloo with dist.backend=auto: say so
    (e.g. a container started without --gpus, a SLURM job without a GPU request)."""
    if requested == "auto" and torch.version.cuda and not torch.cuda.is_available():
        return (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but sees no GPU: training on CPU "
                "over gloo (a container needs launcher.gpus / --gpus, a SLURM job launcher.gpus_per_node)")
    return None


def init_distributed(backend: str = "auto", timeout_s: str | int = "auto") -> DistContext:
    """Join the process group (or run as a lone rank 0 when no launcher is present).

    The caller checks the backend first (:func:`check_backend`), where its error is reported.
    """
    default_cuda_alloc_conf(os.environ)
    rank = int(os.environ.get("RANK", "0"))
    warning = warn_cuda_unused(backend)
    if warning and rank == 0:
        print(f"fft-dist: warning: {warning}", file=sys.stderr, flush=True)
    backend = pick_backend(backend)
    network_env(backend)
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
        timeout = timedelta(seconds=timeout_seconds(timeout_s, backend))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun restarted the group: its store still holds the dead attempt's addresses, and gloo
            # would connect to them. A key prefix per attempt keeps the attempts apart.
            store = dist.PrefixStore(f"/fft-dist/attempt_{attempt}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                timeout=timeout))
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistContext(rank, world_size, local_rank, device, backend, timeout_seconds(timeout_s, backend))


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


def collective_device(group=None) -> torch.device:
    """Where a tensor must be for a collective on `group`: the device type its backend serves.

    Under NCCL only CUDA tensors have a backend ("No backend type associated with device type cpu"
    for anything else); gloo serves the CPU. Every tensor collective of fft-dist goes through the
    helpers below, which move the tensor there and back, so a CPU tensor (an RNG state, a count) never
    reaches an NCCL group as it is (tests/unit/test_collectives.py checks that no other module calls one).
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
