"""How `fft-dist launch` starts the ranks: the launcher part of the typed schema (see :mod:`fft_dist.config`)."""
from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fft_dist.errors import ConfigError

from fft_dist.config.variants import Variants

NO_GPUS = "none"
"""launcher.gpus=none: a container without GPUs, on purpose (CPU ranks over gloo)."""


class LauncherName(str, Enum):
    """The built-in launchers (fft_dist.launchers registers one class each; a registered one of your own
    is as valid: launcher.name is a plain string)."""

    local = "local"
    torchrun = "torchrun"
    deepspeed = "deepspeed"
    slurm = "slurm"
    container = "container"


@dataclass
class LauncherConfig:
    """The options of every launcher. Each launcher's own options are in its subclass below, which
    `launcher=<name>` selects (conf/launcher/<name>.yaml, through :data:`LAUNCHERS`): an option of another
    launcher is refused."""

    name: str = LauncherName.local.value
    """local (`fft-dist train`), torchrun, deepspeed, slurm or container; pick with launcher=<name>."""
    nproc_per_node: int = 2
    """Ranks per node (per machine), for every launcher."""
    master_port: int = 0
    """Rendezvous port on this machine (local, torchrun with nnodes=1, deepspeed, container), or on the first node (slurm). 0: a free one (29500 for slurm and multi-host deepspeed)."""
    dry_run: Any = False
    """true: print exactly what would run (a command, or the whole sbatch script) and run nothing. write: also
    write run.dir/config.yaml (and the sbatch script), so the printed command runs by hand. false: run."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every rank (e.g. {NCCL_SOCKET_IFNAME: eth0})."""

    def __post_init__(self) -> None:
        self.name = getattr(self.name, "value", self.name)  # LauncherName.slurm -> "slurm"
        self.dry_run = dry_run_mode(self.dry_run)


DRY_RUN_WRITE = "write"


def dry_run_mode(value: Any) -> bool | str:
    """launcher.dry_run as False, True or "write" (a YAML or command-line true/false may arrive as text)."""
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if text == DRY_RUN_WRITE:
        return DRY_RUN_WRITE
    raise ConfigError(f"launcher.dry_run={value!r} must be true, false or write")


@dataclass
class TorchrunOptions(LauncherConfig):
    """launcher=torchrun: torchrun's agent on one machine or on each of several (c10d rendezvous)."""

    nnodes: int = 1
    """Machines in the job; each runs `fft-dist launch` with its own launcher.node_rank."""
    node_rank: int = 0
    """This machine's index, 0..nnodes-1. Node 0 writes run.dir/config.yaml and hosts the rendezvous."""
    rdzv_endpoint: str = ""
    """The host:port of the c10d rendezvous on node 0 (required when nnodes > 1)."""
    rdzv_id: str = "fft-dist"
    """Job id shared by all nodes of one job (different jobs on one endpoint need different ids)."""
    local_addr: str = ""
    """This node's address as the other nodes reach it (needed when the hostname resolves elsewhere)."""
    max_restarts: int = 0
    """Restarts of the whole group after a rank fails; restarted ranks resume from the newest complete checkpoint."""


@dataclass
class DeepspeedOptions(LauncherConfig):
    """Launcher=deepspeed: DeepSpeed's runner, on this machine or on hosts over ssh."""

    hosts: list[str] = field(default_factory=list)
    """Host names, written to run.dir/hostfile with nproc_per_node slots each (empty: this machine only)."""
    include: str = ""
    """--include filter, e.g. 'node1:0,1@node2'."""
    exclude: str = ""
    """--exclude filter, e.g. 'node1:3'."""


@dataclass
class SlurmOptions(LauncherConfig):
    """Launcher=slurm: an sbatch script with one node agent per node."""

    nodes: int = 1
    """Nodes (#SBATCH --nodes); one torchrun per node, c10d rendezvous on the first."""
    gpus_per_node: int = 0
    """#SBATCH --gpus-per-node (0: no GPU request, e.g. CPU jobs)."""
    cpus_per_task: str = "auto"
    """CPUs for the one task per node (its ranks), asked for by #SBATCH and again by srun. auto: whole
    nodes (#SBATCH --exclusive) with GPUs, nproc_per_node CPUs without; N: --cpus-per-task=N; 0: no request."""
    partition: str = ""
    """#SBATCH --partition (empty: the default partition)."""
    account: str = ""
    """#SBATCH --account (empty: none)."""
    qos: str = ""
    """#SBATCH --qos (empty: none)."""
    time: str = ""
    """#SBATCH --time limit, e.g. 04:00:00 (empty: the partition's default)."""
    job_name: str = "fft-dist"
    """#SBATCH --job-name."""
    signal_lead_s: int = 120
    """Seconds before the time limit at which SLURM sends USR1 (checkpoint, exit 75); 0: no --signal line."""
    requeue: bool = True
    """Requeue the job after a pre-emption checkpoint (exit 75); it resumes from that checkpoint."""
    sbatch_lines: list[str] = field(default_factory=list)
    """Extra '#SBATCH ...' lines, verbatim (e.g. '#SBATCH --exclusive')."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the ranks start (module load ..., source venv/bin/activate)."""
    use_deepspeed_launcher: bool = False
    """ZeRO backends: start DeepSpeed's launcher on each node (hostfile from the allocation) instead of torchrun."""


@dataclass
class ContainerOptions(LauncherConfig):
    """Launcher=container: docker or podman run of an fft-dist image."""

    image: str = ""
    """The image to run (its entry point must be fft-dist, as docker/Dockerfile* build)."""
    engine: str = "docker"
    """Docker or podman."""
    mounts: list[str] = field(default_factory=list)
    """Extra volumes 'host:container[:ro]'; run.dir is always mounted at the same path."""
    gpus: str = ""
    """The --gpus value: all, a count, or '"device=0,1"'; nproc_per_node follows it (one rank per GPU).
    none: no GPUs on purpose. Empty is refused with a CUDA image or on a host with NVIDIA GPUs (it would train on CPU)."""
    ipc_host: bool = True
    """--ipc=host (shared memory of the host, what NCCL and data loaders want)."""
    shm_size: str = ""
    """--shm-size, e.g. 16g (used when ipc_host=false)."""


LAUNCHERS = Variants("launcher", LauncherConfig)
"""The schema of each `launcher=` option; :func:`fft_dist.launchers.register` adds a launcher's (its class's
``schema``), so a launcher of your own adds its options the way the built-in ones do."""


def host_gpus() -> int:
    """NVIDIA GPUs on this machine (/dev/nvidia0, /dev/nvidia1, ...): what `--gpus all` hands a container."""
    return len([d for d in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", d)])


def gpus_given(gpus: str) -> int | None:
    """How many GPUs a container gets from launcher.gpus (None: none, or not known here, e.g. all on a
    machine whose GPUs are not visible)."""
    value = gpus.strip().strip('"').strip("'")
    if value in ("", NO_GPUS):
        return None
    if value == "all":
        return host_gpus() or None
    if value.isdigit():
        return int(value) or None
    if value.startswith("device="):
        return len([d for d in value[len("device="):].split(",") if d.strip()]) or None
    return None


def gpu_ranks(gpus: str, fallback: int) -> int:
    """launcher=container's default nproc_per_node (the `gpu_ranks` resolver): one rank per GPU given."""
    return gpus_given(str(gpus)) or int(fallback)
