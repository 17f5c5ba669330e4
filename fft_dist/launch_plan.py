"""What each launcher runs, as argument lists: pure (no processes), so dry runs and tests see it all.

Every launcher starts ranks that read one resolved config file (``FFT_DIST_CONFIG``), written once
by ``fft-dist launch`` into ``run.dir``. The options of ``launcher.*`` each belong to some
launchers; one set for a launcher that does not use it is refused (:func:`check_launcher`).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import sys

from fft_dist import config_launcher
from fft_dist.config import ASSETS_DIR, ConfigError, LauncherConfig, LauncherName, Parallelism
from fft_dist.worker import CONFIG_ENV

COMMON = {"name", "nproc_per_node", "dry_run", "env"}
OWN_OPTIONS: dict[LauncherName, set[str]] = {
    LauncherName.local: {"master_port"},
    LauncherName.torchrun: {"master_port", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "local_addr",
                            "max_restarts"},
    LauncherName.deepspeed: {"master_port", "hosts", "include", "exclude"},
    LauncherName.slurm: {"master_port", "nodes", "gpus_per_node", "cpus_per_task", "partition", "account", "qos",
                         "time", "job_name", "signal_lead_s", "requeue", "sbatch_lines", "setup", "use_deepspeed_launcher"},
    LauncherName.container: {"master_port", "image", "engine", "mounts", "gpus", "ipc_host", "shm_size"},
}
SLURM_PORT = 29500
# fft-dist's own torchrun settings: our SignalForwarder handles the stop signals (torchrun's handler
# would kill ranks mid-save), and a short monitor interval notices a dead rank quickly.
AGENT_FLAGS = ["--monitor_interval=0.5", "--signals_to_handle=SIGQUIT"]
HOST_NAME = re.compile(r"\w[\w.:-]*", re.ASCII)
"""A plain host name or address: one word, no leading '-' (it is written into a hostfile and an ssh command)."""


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def check_launcher(launcher: LauncherConfig, parallelism: Parallelism) -> None:
    """Refuse options the chosen launcher would ignore, and values no launcher could use."""
    used = COMMON | OWN_OPTIONS[launcher.name]
    stray = [f"launcher.{f.name}={getattr(launcher, f.name)!r}" for f in dataclasses.fields(launcher)
             if f.name not in used and getattr(launcher, f.name) != _default(f)]
    if stray:
        owners = {f"launcher.{o}": "/".join(n.value for n, opts in OWN_OPTIONS.items() if o in opts)
                  for o in (s.split("=")[0][len("launcher."):] for s in stray)}
        raise ConfigError(f"launcher={launcher.name.value} does not use {', '.join(stray)} (options of: "
                          f"{', '.join(f'{k}: {v}' for k, v in owners.items())}); drop them or pick that launcher")
    rules = [
        (launcher.nproc_per_node >= 1, "launcher.nproc_per_node must be >= 1 (ranks per node)"),
        (0 <= launcher.master_port < 65536, "launcher.master_port must be 0..65535"),
        (launcher.nnodes >= 1 and 0 <= launcher.node_rank < launcher.nnodes,
         f"launcher.node_rank={launcher.node_rank} must be in 0..launcher.nnodes-1 (nnodes={launcher.nnodes})"),
        (launcher.nnodes == 1 or ":" in launcher.rdzv_endpoint,
         "launcher.nnodes > 1 needs launcher.rdzv_endpoint=<node 0 address>:<port> (c10d rendezvous)"),
        (launcher.max_restarts >= 0, "launcher.max_restarts must be >= 0"),
        (launcher.nodes >= 1 and launcher.gpus_per_node >= 0, "launcher.nodes must be >= 1, launcher.gpus_per_node >= 0"),
        (launcher.cpus_per_task == "auto" or launcher.cpus_per_task.isdigit(),
         f"launcher.cpus_per_task={launcher.cpus_per_task!r}: use auto (whole nodes with GPUs, one CPU per rank "
         "without), a number of CPUs for the task of each node, or 0 (no request)"),
        (launcher.signal_lead_s >= 0, "launcher.signal_lead_s must be >= 0 (0: no --signal line)"),
        (all(line.startswith("#SBATCH ") and one_line(line) for line in launcher.sbatch_lines),
         f"launcher.sbatch_lines must each be one line starting with '#SBATCH ': {launcher.sbatch_lines}"),
        (all(HOST_NAME.fullmatch(host) for host in launcher.hosts),
         f"launcher.hosts={launcher.hosts}: each entry must be a plain host name or address (letters, digits, "
         f"'.', ':', '-', '_'; no spaces, no leading '-')"),
        (launcher.engine in ("docker", "podman"), f"launcher.engine={launcher.engine!r}: use docker or podman"),
        (launcher.name != LauncherName.container or bool(launcher.image),
         "launcher=container needs launcher.image=<image built from docker/Dockerfile*>"),
        (not launcher.image.startswith("-") and one_word(launcher.image),
         f"launcher.image={launcher.image!r} must be an image name: one word, not starting with '-' "
         "(the engine would read it as an option)"),
        (not (launcher.ipc_host and launcher.shm_size),
         "launcher.shm_size has no effect with launcher.ipc_host=true (the host's /dev/shm is used); set one"),
        (all(k.isidentifier() for k in launcher.env), f"launcher.env keys must be variable names: {list(launcher.env)}"),
        (not launcher.use_deepspeed_launcher or parallelism in (Parallelism.zero2, Parallelism.zero3),
         f"launcher.use_deepspeed_launcher=true starts DeepSpeed's launcher, for the ZeRO backends; with "
         f"parallelism={parallelism.value} keep the default (torchrun's agent per node)"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    if launcher.name == LauncherName.container:
        check_container_gpus(launcher)


CUDA_IMAGE = re.compile(r"cuda|nvidia|gpu", re.IGNORECASE)
"""An image name or tag that says it is for NVIDIA GPUs (fft-dist:cuda, pytorch/pytorch:...-cuda12.8-..., nvcr.io/nvidia/...)."""


def check_container_gpus(launcher: LauncherConfig) -> None:
    """A container without --gpus sees no GPU, and dist.backend=auto then trains on CPU over gloo, silently:
    with a CUDA image or on a host with NVIDIA GPUs an empty launcher.gpus is refused (none: CPU on purpose).
    More ranks than the GPUs given would crash at start; refused here."""
    gpus = launcher.gpus.strip()
    host = config_launcher.host_gpus()
    if not gpus and (CUDA_IMAGE.search(launcher.image) or host):
        why = f"launcher.image={launcher.image} is a CUDA image" if CUDA_IMAGE.search(launcher.image) else \
            f"this host has {host} NVIDIA GPU(s)"
        raise ConfigError(f"launcher=container: {why}, but launcher.gpus is empty, so the container would see no GPU "
                          "and train on CPU over gloo. Set launcher.gpus=all (or a count, or '\"device=0,1\"'); "
                          "launcher.gpus=none trains on CPU on purpose")
    given = config_launcher.gpus_given(gpus)
    if given is not None and launcher.nproc_per_node > given:
        raise ConfigError(f"launcher.nproc_per_node={launcher.nproc_per_node} ranks, but launcher.gpus={gpus} gives the "
                          f"container {given} GPU(s): one rank per GPU (drop launcher.nproc_per_node to follow the GPUs)")


def world_size(launcher: LauncherConfig) -> int:
    """Ranks in the whole job (what batch sizes must divide by)."""
    nodes = {LauncherName.torchrun: launcher.nnodes, LauncherName.slurm: launcher.nodes,
             LauncherName.deepspeed: max(1, len(launcher.hosts))}.get(launcher.name, 1)
    return nodes * launcher.nproc_per_node


def ranks_on_this_machine(launcher: LauncherConfig) -> bool:
    """Whether the ranks run here, with this machine's torch and devices (a container's image and a
    SLURM or ssh host may differ: what they have is checked when the ranks start)."""
    return launcher.name in (LauncherName.local, LauncherName.torchrun) or (
        launcher.name == LauncherName.deepspeed and not launcher.hosts)


def threads_per_rank(local_ranks: int) -> int:
    """OMP_NUM_THREADS for each of `local_ranks` ranks: the CPUs this process may run on (its affinity:
    what SLURM or a container gave the task, not the whole machine) shared out, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_ranks))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_args(launcher: LauncherConfig) -> list[str]:
    """torchrun's arguments (up to the module) for launcher=local or launcher=torchrun on this node.

    Options take their values attached (``--rdzv_id=<id>``), so a value starting with '-' stays a value.
    """
    args = [f"--nproc_per_node={launcher.nproc_per_node}"]
    if launcher.name == LauncherName.torchrun and launcher.nnodes > 1:
        args += [f"--nnodes={launcher.nnodes}", f"--node_rank={launcher.node_rank}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={launcher.rdzv_endpoint}", f"--rdzv_id={launcher.rdzv_id}",
                 # c10d cannot tell which node hosts the store when all nodes share a hostname; say it
                 f"--rdzv_conf=is_host={str(launcher.node_rank == 0).lower()}"]
        if launcher.local_addr:
            args.append(f"--local_addr={launcher.local_addr}")
    elif launcher.master_port:
        args += ["--master_addr=127.0.0.1", f"--master_port={launcher.master_port}"]
    else:
        args += ["--standalone"]
    restarts = launcher.max_restarts if launcher.name == LauncherName.torchrun else 0
    return [*args, f"--max_restarts={restarts}", *AGENT_FLAGS]


def hostfile_text(launcher: LauncherConfig) -> str:
    return "".join(f"{host} slots={launcher.nproc_per_node}\n" for host in launcher.hosts)


DEEPSPEED_RUNNER = [sys.executable, "-m", "deepspeed.launcher.runner"]  # the `deepspeed` command, no PATH lookup


def deepspeed_argv(launcher: LauncherConfig, *, hostfile: str | None, master_port: int) -> list[str]:
    """The deepspeed launcher's command line."""
    argv = list(DEEPSPEED_RUNNER)
    argv.append(f"--hostfile={hostfile}" if hostfile else f"--num_gpus={launcher.nproc_per_node}")
    if launcher.include:
        argv.append(f"--include={launcher.include}")
    if launcher.exclude:
        argv.append(f"--exclude={launcher.exclude}")
    return [*argv, f"--master_port={master_port}", "--module", "fft_dist.train"]


DS_EXPORT_UNSAFE = frozenset('"$`\\\n\r')
"""DeepSpeed's pdsh runner puts each DS_ENV_FILE value into `export KEY="value";` of a shell command
on every host (multinode_runner.add_export, 0.19): inside double quotes these still mean something."""


def deepspeed_env_text(env: dict[str, str]) -> str:
    """DS_ENV_FILE contents: what the deepspeed launcher exports on every host (KEY=VALUE lines)."""
    bad = [k for k, v in env.items() if DS_EXPORT_UNSAFE & set(v)]
    if bad:
        raise ConfigError(f"launcher.env / run.dir {bad}: with launcher.hosts, DeepSpeed's launcher exports each "
                          'value on every host as export KEY="value" in a shell command, where a line break, ", $, ` '
                          "or \\ would be read by that shell; use values without them")
    return "".join(f"{k}={v}\n" for k, v in env.items())


def container_argv(launcher: LauncherConfig, *, run_dir: str, config_path: str) -> list[str]:
    """`docker|podman run ...` that starts the ranks inside the image, reading the same config file.

    Every option carries its value attached (``--volume=<spec>``, ``--env=KEY=VALUE``), so no value
    can be read as an option; the image (refused when it starts with '-') is the one positional word.

    The resolved config names this install's bundled files (the default data set and tokenizer);
    they are mounted read-only at the same path, so the image's fft-dist finds them there.
    """
    if ":" in run_dir or not one_line(run_dir):
        raise ConfigError(f"run.dir={run_dir!r}: launcher=container mounts it as --volume=<dir>:<dir>, so it "
                          "cannot hold ':' or a line break; pick another run.dir")
    argv = [launcher.engine, "run", "--rm", "--network=host", f"--volume={run_dir}:{run_dir}",
            f"--volume={ASSETS_DIR}:{ASSETS_DIR}:ro"]
    argv += [f"--volume={mount}" for mount in launcher.mounts]
    gpus = launcher.gpus.strip()
    if gpus and gpus != config_launcher.NO_GPUS:  # docker reads the value as CSV: a device list needs its quotes
        argv.append(f'--gpus="{gpus}"' if "," in gpus and not gpus.startswith('"') else f"--gpus={gpus}")
    if launcher.ipc_host:
        argv.append("--ipc=host")
    elif launcher.shm_size:
        argv.append(f"--shm-size={launcher.shm_size}")
    argv += [f"--env={key}={value}" for key, value in {**launcher.env, CONFIG_ENV: config_path}.items()]
    node = torchrun_args(dataclasses.replace(launcher, name=LauncherName.local))
    return [*argv, launcher.image, "node", *node]


def one_line(text: str) -> bool:
    """No line break or other control character: safe inside a comment or an #SBATCH line."""
    return not any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def one_word(text: str) -> bool:
    return one_line(text) and not any(ch.isspace() for ch in text)


def shell_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A copy-pasteable shell command, every word quoted as needed (POSIX quotes: `shlex.split` reads
    it back exactly; a value holding a newline keeps it, inside its quotes)."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*prefix, *(shlex.quote(a) for a in argv)])


_C_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _ansi_c(ch: str) -> str:
    return _C_ESCAPES.get(ch) or (ch if one_line(ch) else f"\\x{ord(ch):02x}")


def comment_words(argv: list[str]) -> str:
    """`argv` as shell words on one line, for a comment that must stay one line and copy-pasteable:
    a word holding a newline or another control character is written in bash's ANSI-C quoting,
    ``$'line 1\\nline 2'``; the others as `shlex.quote` writes them."""
    return " ".join(shlex.quote(a) if one_line(a) else "$'" + "".join(map(_ansi_c, a)) + "'" for a in argv)
