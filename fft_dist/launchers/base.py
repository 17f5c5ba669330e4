"""The launcher seam: one class per launcher (its options, checks, world size, dry-run text and run),
found by name in one registry. A new launcher is one module that registers its class plus one
``conf/launcher/<name>.yaml``; nothing else names launchers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from fft_dist import plugins
from fft_dist.config import LAUNCHERS, ConfigError, LauncherConfig
from fft_dist.plugins import import_env_modules
from fft_dist.preemption import SignalForwarder

CONFIG_ENV = "FFT_DIST_CONFIG"
"""Set by the launcher: the resolved config.yaml every rank reads (no overrides allowed then)."""
STOPPED_ENV = "FFT_DIST_STOPPED"
"""Set by the launcher after a stop signal: a rank torchrun restarts after that stops at once."""
PLUGINS_ENV = plugins.ENV
"""Comma-separated modules of your own (e.g. a launcher class that calls :func:`register`), imported
before composing: a new launcher needs no fork of fft-dist (:mod:`fft_dist.plugins`)."""


@dataclass
class Job:
    """What a launcher starts: its options from the resolved config, the run dir holding config.yaml,
    and what the launch command needs from the layers above (they pass it down; nothing reaches up)."""

    options: LauncherConfig
    run_dir: Path
    command: list[str]
    """The fft-dist command line that made the job (recorded in a generated script)."""
    forwarder: SignalForwarder | None = None
    rank_here: Callable[[], int] = lambda: 0
    """Be the job's only rank in this process (launcher=local with one rank)."""
    release_locks: Callable[[], None] = lambda: None
    """Hand the run's locks over to a job that starts after this process exits (sbatch)."""

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    def env(self) -> dict[str, str]:
        """What every rank gets in its environment: the config file, then launcher.env."""
        return {CONFIG_ENV: str(self.config_path), **self.options.env}


class Launcher:
    """One way of starting the ranks. Subclasses set `name` and `schema` and override what differs."""

    name: ClassVar[str]
    schema: ClassVar[type[LauncherConfig]] = LauncherConfig
    """Its options: a subclass of LauncherConfig adding its own fields (``launcher=<name>`` selects it, so
    Hydra refuses another launcher's option by itself); LauncherConfig for a launcher with none.
    :func:`register` adds it to :data:`fft_dist.config.LAUNCHERS`, the group's one registry of schemas."""
    supervises: ClassVar[bool] = True
    """This process supervises the ranks (stop signals go to them); a container's own agent does instead."""
    own_packages: ClassVar[bool] = True
    """The ranks import this install's packages (a container's image brings its own)."""

    def __init__(self, options: LauncherConfig):
        self.cfg = options

    def first_node(self) -> bool:
        """This machine hosts the job's first node (it writes run.dir/config.yaml)."""
        return True

    def nodes(self) -> int:
        """Machines the job runs on; the job's world size is nodes x launcher.nproc_per_node."""
        return 1

    def world_size(self) -> int:
        """Ranks in the whole job (what batch sizes must divide by): the one world-size rule."""
        return self.nodes() * self.cfg.nproc_per_node

    def ranks_here(self) -> bool:
        """Whether the ranks run on this machine with its torch and devices (checked before launch)."""
        return True

    def check(self, backend) -> None:
        """Refuse values of its own options that cannot work (called after the common checks). `backend`: the
        chosen backend's descriptor (fft_dist.strategy.Backend: its name, what it needs, e.g. deepspeed_stage)."""

    def describe(self, job: Job) -> str:
        """Exactly what `run` would do, as shell text (the dry run's stdout)."""
        raise NotImplementedError

    def run(self, job: Job) -> int:
        """Start (or submit) the ranks; the job's exit code."""
        raise NotImplementedError

    submit_with: ClassVar[str] = ""
    """The program that takes the script `write` writes, by hand (slurm: sbatch); empty: run what `describe` printed."""

    def write(self, job: Job) -> list[Path]:
        """launcher.dry_run=write: write the files `run` would write besides config.yaml (a script), so what
        `describe` printed runs by hand; the paths written (none by default)."""
        return []


REGISTRY: dict[str, type[Launcher]] = {}


def register(cls: type[Launcher]) -> type[Launcher]:
    """Class decorator: make `launcher=<cls.name>` start the ranks with `cls` (the one registration point).

    Its schema joins :data:`fft_dist.config.LAUNCHERS` (:mod:`fft_dist.config.variants`): composing stores it
    for Hydra as ``launcher_schema/<name>``, and ``conf/launcher/<name>.yaml`` names it in its defaults list
    (``- /launcher_schema/<name>@_here_``).
    """
    LAUNCHERS.add(cls.name, cls.schema)  # refuses a schema that is not a LauncherConfig dataclass
    REGISTRY[cls.name] = cls
    return cls


def import_plugins() -> None:
    """Import the modules named in :data:`PLUGINS_ENV` (each registers what it adds)."""
    import_env_modules()


def launcher_for(options: LauncherConfig) -> Launcher:
    """The registered launcher for launcher.name, holding `options`."""
    name = getattr(options.name, "value", options.name)
    if name not in REGISTRY:
        import_plugins()
    if name not in REGISTRY:
        raise ConfigError(f"launcher.name={name!r}: no such launcher (known: {', '.join(sorted(REGISTRY))}; a module "
                          f"of your own that registers one is imported when named in {PLUGINS_ENV})")
    return REGISTRY[name](options)


def check_launcher(options: LauncherConfig, backend) -> Launcher:
    """Refuse values the chosen launcher could not use (its schema already refuses other launchers'
    options); the launcher. `backend`: the chosen backend's descriptor (the caller, above the backend
    registry's layer, looks it up)."""
    launcher = launcher_for(options)
    rules = [
        (options.nproc_per_node >= 1, "launcher.nproc_per_node must be >= 1 (ranks per node)"),
        (0 <= options.master_port < 65536, "launcher.master_port must be 0..65535"),
        (all(k.isidentifier() for k in options.env), f"launcher.env keys must be variable names: {list(options.env)}"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    launcher.check(backend)
    return launcher
