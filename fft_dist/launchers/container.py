"""launcher=container: ``docker|podman run`` of an fft-dist image whose own node agent starts the ranks."""
from __future__ import annotations

import os
import re
import subprocess

from fft_dist.config import launcher as config_launcher
from fft_dist.config.launcher import ContainerOptions
from fft_dist.config import ASSETS_DIR, ConfigError, LauncherConfig
from fft_dist.launchers.base import CONFIG_ENV, Job, Launcher, register
from fft_dist.launchers.shell import one_line, one_word, shell_line
from fft_dist.launchers.torchrun import torchrun_args

CUDA_IMAGE = re.compile(r"cuda|nvidia|gpu", re.IGNORECASE)
"""An image name or tag that says it is for NVIDIA GPUs (fft-dist:cuda, pytorch/pytorch:...-cuda12.8-..., nvcr.io/nvidia/...)."""


def check_container_gpus(options: LauncherConfig) -> None:
    """A container without --gpus sees no GPU, and dist.backend=auto then trains on CPU over gloo, silently:
    with a CUDA image or on a host with NVIDIA GPUs an empty launcher.gpus is refused (none: CPU on purpose).
    More ranks than the GPUs given would crash at start; refused here."""
    gpus = options.gpus.strip()
    host = config_launcher.host_gpus()
    if not gpus and (CUDA_IMAGE.search(options.image) or host):
        why = f"launcher.image={options.image} is a CUDA image" if CUDA_IMAGE.search(options.image) else \
            f"this host has {host} NVIDIA GPU(s)"
        raise ConfigError(f"launcher=container: {why}, but launcher.gpus is empty, so the container would see no GPU "
                          "and train on CPU over gloo. Set launcher.gpus=all (or a count, or '\"device=0,1\"'); "
                          "launcher.gpus=none trains on CPU on purpose")
    given = config_launcher.gpus_given(gpus)
    if given is not None and options.nproc_per_node > given:
        raise ConfigError(f"launcher.nproc_per_node={options.nproc_per_node} ranks, but launcher.gpus={gpus} gives the "
                          f"container {given} GPU(s): one rank per GPU (drop launcher.nproc_per_node to follow the GPUs)")


def container_argv(options: LauncherConfig, *, run_dir: str, config_path: str) -> list[str]:
    """`docker|podman run ...` that starts the ranks inside the image, reading the same config file.

    Every option carries its value attached (``--volume=<spec>``, ``--env=KEY=VALUE``), so no value
    can be read as an option; the image (refused when it starts with '-') is the one positional word.

    The resolved config names this install's bundled files (the default data set and tokenizer);
    they are mounted read-only at the same path, so the image's fft-dist finds them there.
    """
    if ":" in run_dir or not one_line(run_dir):
        raise ConfigError(f"run.dir={run_dir!r}: launcher=container mounts it as --volume=<dir>:<dir>, so it "
                          "cannot hold ':' or a line break; pick another run.dir")
    argv = [options.engine, "run", "--rm", "--network=host", f"--volume={run_dir}:{run_dir}",
            f"--volume={ASSETS_DIR}:{ASSETS_DIR}:ro"]
    argv += [f"--volume={mount}" for mount in options.mounts]
    gpus = options.gpus.strip()
    if gpus and gpus != config_launcher.NO_GPUS:  # docker reads the value as CSV: a device list needs its quotes
        argv.append(f'--gpus="{gpus}"' if "," in gpus and not gpus.startswith('"') else f"--gpus={gpus}")
    if options.ipc_host:
        argv.append("--ipc=host")
    elif options.shm_size:
        argv.append(f"--shm-size={options.shm_size}")
    argv += [f"--env={key}={value}" for key, value in {**options.env, CONFIG_ENV: config_path}.items()]
    node = torchrun_args(options)  # one node inside the container
    return [*argv, options.image, "node", *node]


@register
class ContainerLauncher(Launcher):
    name = "container"
    schema = ContainerOptions
    supervises = False  # in a container, its own node agent supervises the ranks
    own_packages = False

    def ranks_here(self) -> bool:
        return False

    def check(self, backend) -> None:
        lch = self.cfg
        rules = [
            (lch.engine in ("docker", "podman"), f"launcher.engine={lch.engine!r}: use docker or podman"),
            (bool(lch.image), "launcher=container needs launcher.image=<image built from docker/Dockerfile*>"),
            (not lch.image.startswith("-") and one_word(lch.image),
             f"launcher.image={lch.image!r} must be an image name: one word, not starting with '-' "
             "(the engine would read it as an option)"),
            (not (lch.ipc_host and lch.shm_size),
             "launcher.shm_size has no effect with launcher.ipc_host=true (the host's /dev/shm is used); set one"),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)
        check_container_gpus(lch)

    def argv(self, job: Job) -> list[str]:
        return container_argv(self.cfg, run_dir=str(job.run_dir), config_path=str(job.config_path))

    def describe(self, job: Job) -> str:
        return shell_line(self.argv(job))

    def run(self, job: Job) -> int:
        argv = self.argv(job)
        print(f"fft-dist: run dir {job.run_dir}; running {shell_line(argv)}", flush=True)
        return subprocess.run(argv, env={**os.environ, **job.env()}, check=False).returncode
