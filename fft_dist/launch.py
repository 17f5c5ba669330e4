"""Launching: resolve the config once, check everything cheap, then start (or become) the ranks.

``fft-dist train`` resolves and validates the config in one process, runs the pre-launch checks
(config, backend, data, resume path, run directory), writes ``run.dir/config.yaml`` and starts
``launcher.nproc_per_node`` ranks through ``torch.distributed.run`` (torchrun's own code). Every
rank reads that file (:data:`CONFIG_ENV`). Under a user's own torchrun or deepspeed launcher,
each rank composes the overrides and rank 0's resolution is broadcast, so ``${now:}`` and the
like cannot differ between ranks. ``python -m fft_dist.train`` is the worker entry point.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fft_dist import exit_codes
from fft_dist.compose import prepare, report
from fft_dist.config import BatchPlan, FFTConfig
from fft_dist.errors import classify
from fft_dist.preemption import SignalForwarder, StartupInterrupted, signal_name
from fft_dist.worker import CONFIG_ENV, run_worker


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
    from fft_dist.data import check_data_files
    from fft_dist.metrics import check_logging
    from fft_dist.strategy import check as check_strategy

    check_strategy(cfg, plan)
    check_logging(cfg)
    check_data_files(cfg.data)
    if cfg.model.path is not None:
        from fft_dist.model import hf_config

        hf_config(cfg.model)  # a broken config.json is a named error now, not a rank traceback
    if cfg.resume not in ("none", "auto"):
        find_resume(cfg.resume, Path(cfg.checkpoint.dir))


def train_command(overrides: list[str], *, config_dirs: list[str] | None = None) -> int:
    """``fft-dist train``: a rank when a launcher started us, else the self-launcher."""
    overrides = strip_launcher_args(overrides)
    if launched_by_launcher():
        return run_worker(overrides)
    forwarder = SignalForwarder()
    try:
        return _self_launch(overrides, config_dirs, forwarder)
    except StartupInterrupted as e:
        print(f"fft-dist: received {e}; stopped before any rank started (nothing trained, nothing saved)",
              file=sys.stderr, flush=True)
        return exit_codes.STOPPED_NO_CHECKPOINT


def _self_launch(overrides: list[str], config_dirs: list[str] | None, forwarder: SignalForwarder) -> int:
    from fft_dist.rundir import prepare_run_dir

    try:
        prepared = prepare(overrides, world_size=None, config_dirs=config_dirs)
        cfg, nproc = prepared.cfg, prepared.cfg.launcher.nproc_per_node
        preflight(cfg, prepared.plan)
        run_dir = prepare_run_dir(cfg, prepared.yaml)
    except Exception as e:  # noqa: BLE001 - known errors get their exit code, bugs their traceback
        known = classify(e)
        if known is None:
            raise
        report(*known[:1], e)
        return known[1]
    print(f"fft-dist: run dir {run_dir}; starting {nproc} rank(s)", flush=True)
    return start_ranks(run_dir / "config.yaml", nproc, cfg.launcher.master_port, forwarder)


def start_ranks(config_path: Path, nproc: int, master_port: int, forwarder: SignalForwarder) -> int:
    """Start `nproc` workers with torch.distributed.run and return the job's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ[CONFIG_ENV] = str(config_path)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Our forwarder handles the stop signals; torchrun's handler would kill the ranks mid-save.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    rdzv = ["--standalone"] if master_port == 0 else ["--master_addr", "127.0.0.1", "--master_port", str(master_port)]
    args = get_args_parser().parse_args(
        ["--nproc_per_node", str(nproc), *rdzv, "--max_restarts", "0", "--monitor_interval", "0.5",
         "--signals_to_handle", "SIGQUIT", "-m", "fft_dist.train"]
    )
    try:
        run(args)
    except ChildFailedError as e:
        return job_exit_code(e.failures, forwarder)
    return exit_codes.OK


def job_exit_code(failures: dict, forwarder: SignalForwarder) -> int:
    """The exit code of the rank that failed first (the others were stopped because of it)."""
    first = min(failures.values(), key=lambda f: f.timestamp)
    code = first.exitcode
    if code in exit_codes.DOCUMENTED:
        return code
    if code < 0:
        print(f"fft-dist: rank {first.local_rank} was killed by {signal_name(-code)}"
              f"{' (after ' + signal_name(forwarder.received) + ')' if forwarder.received else ''}",
              file=sys.stderr, flush=True)
        return 128 - code
    print(f"fft-dist: rank {first.local_rank} failed with exit code {code}; see its messages above",
          file=sys.stderr, flush=True)
    return code


