"""Launching: resolve the config once, check everything cheap, then start (or submit) the ranks.

``fft-dist launch`` (``fft-dist train`` is its ``launcher=local`` form) resolves and validates the
config in one process (:func:`fft_dist.compose.checked`, the path every command shares), runs the
pre-launch checks (backend, data, resume path, run directory), writes ``run.dir/config.yaml`` and
hands the job to the chosen launcher's class (:mod:`fft_dist.launchers`): torchrun's agent in this
process (local, torchrun), the deepspeed launcher, ``sbatch`` or a container engine.
Every rank reads that file (:data:`CONFIG_ENV`). Under a user's own torchrun or deepspeed
launcher, each rank composes the overrides and rank 0's resolution is broadcast, so ``${now:}``
and the like cannot differ between ranks. ``python -m fft_dist.train`` is the entry point of every rank (:mod:`fft_dist.rank`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fft_dist import exit_codes
from fft_dist.compose import Prepared, checked, override_keys, report_known, typed
from fft_dist.config import BatchPlan, ConfigError, FFTConfig, LauncherConfig, ResumeKind
from fft_dist.config.launcher import DRY_RUN_WRITE
from fft_dist.launchers import CONFIG_ENV, Job, launcher_for
from fft_dist.launchers.agent import (DEEPSPEED_RUNNER, StopForwarder, run_deepspeed, start_agent,
                                      threads_per_rank)
from fft_dist.preemption import SignalForwarder, StartupInterrupted, StopSignal, become_supervisor
from fft_dist.rank import run_worker


def launched_by_launcher() -> bool:
    """True when a launcher (torchrun, deepspeed, srun+torchrun) already started us as a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N` that the deepspeed launcher appends (Hydra rejects them).

    LOCAL_RANK is also in the environment, which is what we read.
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        out.append(arg)
    return out


def preflight(cfg: FFTConfig, plan: BatchPlan) -> None:
    """Checks that need a package or a file but no process group: run before any rank starts."""
    from fft_dist.checkpoint import find_resume
    from fft_dist.checkpoint.layout import check_latest_slot
    from fft_dist.data import check_data_files
    from fft_dist.dist import check_backend
    from fft_dist.loss import check as check_loss
    from fft_dist.metrics import check_logging
    from fft_dist.model import check_model
    from fft_dist.models.conversions import check_pretrained_layout
    from fft_dist.strategy import check as check_strategy

    check_strategy(cfg, plan)
    check_loss(cfg.loss, fmt=cfg.data.format)  # plugins import, every term known, before any rank
    check_logging(cfg)
    check_data_files(cfg.data)
    launcher = launcher_for(cfg.launcher)
    here = launcher.ranks_here()
    if here:
        check_backend(cfg.dist.backend)
    check_model(cfg, ranks_here=here, our_packages=launcher.own_packages)
    check_pretrained_layout(cfg)
    check_latest_slot(Path(cfg.checkpoint.dir))
    if cfg.resume_request.kind is ResumeKind.path:  # auto may find nothing; a named checkpoint must be there
        find_resume(cfg.resume, Path(cfg.checkpoint.dir))


def train_command(overrides: list[str], *, config_dirs: list[str] | None = None) -> int:
    """``fft-dist train``: a rank when a launcher started us, else ``fft-dist launch launcher=local``."""
    overrides = strip_launcher_args(overrides)
    if launched_by_launcher():
        from fft_dist.dist import exit_rank

        exit_rank(run_worker(overrides))
    return launch_command(overrides, config_dirs=config_dirs, only_local=True)


def launch_command(overrides: list[str], *, config_dirs: list[str] | None = None, only_local: bool = False) -> int:
    """``fft-dist launch``: resolve once, check, write run.dir/config.yaml, then run or submit the job."""
    forwarder = StopForwarder()
    try:
        return _launch(overrides, config_dirs, forwarder, only_local=only_local)
    except StartupInterrupted as e:
        print(f"fft-dist: received {e}; stopped before any rank started (nothing trained, nothing saved)",
              file=sys.stderr, flush=True)
        return exit_codes.STOPPED_NO_CHECKPOINT


def node_command(argv: list[str]) -> int:
    """``fft-dist node <torchrun args>`` (or ``node --deepspeed <runner args>``): one node's agent
    (SLURM, containers) for an already written config."""
    if not os.environ.get(CONFIG_ENV):
        print(f"fft-dist node: set {CONFIG_ENV} to the run's config.yaml (fft-dist launch writes it)",
              file=sys.stderr, flush=True)
        return exit_codes.CONFIG_ERROR
    try:
        _lock_for_slurm_job()
        if argv[:1] == ["--deepspeed"]:  # DeepSpeed's runner leaves OMP_NUM_THREADS unset: set it for its ranks
            from fft_dist.compose import load_yaml

            nproc = load_yaml(os.environ[CONFIG_ENV]).launcher.nproc_per_node
            os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    except ConfigError as e:
        return report_known(e)
    become_supervisor()
    if argv[:1] == ["--deepspeed"]:
        return run_deepspeed([*DEEPSPEED_RUNNER, *argv[1:]], dict(os.environ), StopForwarder())
    return start_agent(argv, StopForwarder())


def _lock_for_slurm_job() -> None:
    """A SLURM job's first node holds the run's locks while its ranks run (``fft-dist launch`` only
    submitted the job and is gone): a second job on the same run.dir or checkpoint.dir is refused."""
    if not os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_NODEID", "0") != "0":
        return
    from fft_dist.compose import load_yaml
    from fft_dist.rundir import lock_run

    lock_run(load_yaml(os.environ[CONFIG_ENV]))


def _resolve(overrides: list[str], config_dirs: list[str] | None, *, only_local: bool) -> Prepared:
    """The one path (compose, type, validate against the whole job's world size), refusing for
    `fft-dist train` a launcher that does not start the ranks here."""
    cfg, yaml = typed(overrides, config_dirs=config_dirs)
    if only_local and cfg.launcher.name != "local":
        raise ConfigError(f"fft-dist train starts ranks on this machine (launcher=local); for "
                          f"launcher={cfg.launcher.name} use `fft-dist launch`")
    return checked(cfg, yaml)


def _launch(overrides: list[str], config_dirs: list[str] | None, forwarder: SignalForwarder, *,
            only_local: bool) -> int:
    from fft_dist.rundir import prepare_run_dir, release_locks

    try:
        prepared = _resolve(overrides, config_dirs, only_local=only_local)
        cfg, launcher = prepared.cfg, prepared.cfg.launcher
        preflight(cfg, prepared.plan)
        starter = launcher_for(launcher)
        secondary = not starter.first_node()  # a later node of a multi-node job reads node 0's config.yaml
        if secondary and "run.dir" not in override_keys(overrides):
            raise ConfigError("launcher.node_rank > 0 reads node 0's run.dir/config.yaml: pass the same explicit "
                              "run.dir=<shared folder> on every node")
        job = Job(launcher, Path(cfg.run.dir).resolve(), ["fft-dist", "launch", *overrides], forwarder=forwarder,
                  rank_here=lambda: run_in_process(launcher), release_locks=release_locks)
        text = starter.describe(job)  # checks what only rendering finds (e.g. an #SBATCH value that needs quoting)
        if launcher.dry_run == DRY_RUN_WRITE and not secondary:
            text += _write_without_running(cfg, prepared.yaml, starter, job)
        elif not (launcher.dry_run or secondary):
            prepare_run_dir(cfg, prepared.yaml)
    except Exception as e:  # noqa: BLE001 - known errors get their exit code, bugs their traceback
        return report_known(e)
    if launcher.dry_run:
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `... | head`: the reader has what it wanted
            sys.stdout = open(os.devnull, "w", encoding="utf-8")
        return exit_codes.OK
    if forwarder.received is not None:  # its StartupInterrupted was lost (raised where Python swallows exceptions:
        raise StartupInterrupted(forwarder.received)  # a finaliser, a weakref callback): still no rank may start
    if starter.supervises:
        become_supervisor()
    return starter.run(job)


def _write_without_running(cfg: FFTConfig, yaml: str, starter, job: Job) -> str:
    """launcher.dry_run=write: claim run.dir and write config.yaml as a launch would (with dry_run=false, so
    the file is what that launch writes) and the launcher's script; the locks go, as for a submitted job."""
    from omegaconf import OmegaConf

    from fft_dist.rundir import prepare_run_dir, release_locks

    node = OmegaConf.create(yaml)
    node.launcher.dry_run = False
    try:
        prepare_run_dir(cfg, OmegaConf.to_yaml(node))
        written = [job.config_path, *starter.write(job)]
    except OSError as e:
        raise ConfigError(f"run.dir={job.run_dir} is not writable: {e.strerror or e}") from None
    finally:
        release_locks()
    by_hand = (f"{starter.submit_with} {written[-1]}" if starter.submit_with and len(written) > 1
               else "the command above")
    return (f"\n# launcher.dry_run=write wrote {', '.join(str(p) for p in written)}; "
            f"nothing was started. Run it by hand: {by_hand}")


def run_in_process(launcher: LauncherConfig) -> int:
    """Be the job's only rank: what torchrun's agent would start, without a second process.

    The rank's stop-signal handler replaces the launcher's here, so a stop signal from now on
    finishes the step, checkpoints and exits 75, as it does for a rank under the agent; before it,
    the launcher's handler reports that nothing started (76). RANK stays unset: the rank must not
    die with the user's shell (die_with_parent is for ranks under a launcher).
    """
    from fft_dist.dist import exit_rank

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # torchrun would set them afresh; a stray WORLD_SIZE must not count
    os.environ["LOCAL_RANK"] = "0"  # what torchrun gives its only rank (DeepSpeed reads it to pick the device)
    if launcher.master_port:
        os.environ["MASTER_PORT"] = str(launcher.master_port)  # init_distributed keeps a set port
    if "OMP_NUM_THREADS" not in os.environ:  # what start_agent gives one rank; torch is imported already
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(1))
        torch.set_num_threads(threads_per_rank(1))
    stop = StopSignal()
    exit_rank(run_worker([], stop=stop))  # like a rank: gloo may abort in interpreter finalisation
    return exit_codes.OK  # not reached
