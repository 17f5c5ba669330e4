"""One rank's life: get the one resolved config, join the process group, train, report.

The config comes from the file the self-launcher wrote (:data:`CONFIG_ENV`), or, under a user's
own torchrun / deepspeed launcher, from composing the overrides on every rank and taking rank 0's
resolution. Errors the user can fix are reported once (rank 0) with their documented exit code;
anything else is a bug and keeps its traceback (exit 1).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from fft_dist import exit_codes
from fft_dist.compose import Prepared, checked, load_text, prepare, report, report_known
from fft_dist.config import ConfigError
from fft_dist.errors import CheckpointError
from fft_dist.launchers import CONFIG_ENV, STOPPED_ENV
from fft_dist.preemption import StopSignal, die_with_parent

RESTART_ENVS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
"""Set > 0 by torchrun (group restart) and SLURM (requeue): this run already ran and may have checkpoints."""


def restarted() -> bool:
    return any(int(os.environ.get(name) or 0) > 0 for name in RESTART_ENVS)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_worker_config(argv: list[str]) -> tuple[Prepared, bool]:
    """(prepared config, came_from_file) for a rank: the launcher's file, else compose the overrides."""
    path = os.environ.get(CONFIG_ENV)
    world = env_world_size()
    if path:
        if argv:
            raise ConfigError(f"{CONFIG_ENV}={path} is set, so command-line overrides {argv} would be ignored")
        text = Path(path).read_text(encoding="utf-8")
        cfg = load_text(text)
        if restarted():
            from fft_dist.checkpoint.resume import after_restart

            cfg.resume = after_restart(cfg.resume)
        return checked(cfg, text, world_size=world), True
    return prepare(argv, world_size=world), False


def agree_on_config(prepared: Prepared) -> Prepared:
    """Rank 0's resolution wins (collective): ``${now:}`` cannot differ between ranks."""
    from fft_dist.dist import broadcast_small

    text = broadcast_small(prepared.yaml)
    if text == prepared.yaml:
        return prepared
    return checked(load_text(text), text, world_size=env_world_size())


def run_worker(argv: list[str], *, stop: StopSignal | None = None) -> int:
    stop = stop or StopSignal()
    if "RANK" in os.environ:
        die_with_parent()
    if os.environ.get(STOPPED_ENV) and restarted():
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fft-dist: not restarting: the job was stopped by {os.environ[STOPPED_ENV]}", flush=True)
        return exit_codes.PREEMPTED
    from fft_dist.dist import barrier, check_backend, destroy, init_distributed

    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        prepared, from_file = load_worker_config(argv)
        check_backend(prepared.cfg.dist.backend)  # e.g. nccl on a machine without GPUs: exit 2, not a traceback
    except Exception as e:  # noqa: BLE001 - identical on every rank: report once
        return report_known(e, show=is_rank0)
    cfg = prepared.cfg
    ctx = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    if ctx.is_main:
        from fft_dist.dist import describe_timeout

        print(f"fft-dist: {describe_timeout(cfg.dist.timeout_s, ctx)}", flush=True)
    try:
        if not from_file:
            prepared = claim_run_dir(prepared, ctx)
        from fft_dist.trainer import Trainer

        summary = Trainer(prepared.cfg, ctx=ctx, plan=prepared.plan, config_yaml=prepared.yaml, stop=stop).run()
        barrier()  # nothing in flight when the group goes away: gloo aborts a rank whose peer left mid-flight
    except Exception as e:  # noqa: BLE001 - config, data and checkpoint errors are agreed across ranks
        code = report_known(e, show=ctx.is_main)
        barrier()  # every rank raised the same known error; leave together
        return code
    finally:
        destroy()
    if not ctx.is_main:
        return summary.exit_code
    try:
        if summary.export_source is not None:
            code = _export(summary)  # after the process group is gone: no collective timeout applies
            if code:
                return code
    finally:
        if summary.tokenizer_dir is not None:  # the run's tokenizer folder (a temporary of this process)
            shutil.rmtree(summary.tokenizer_dir, ignore_errors=True)
    print_summary(summary)
    return summary.exit_code


def claim_run_dir(prepared, ctx):
    """Under a user's own launcher: agree on rank 0's config, and rank 0 prepares run.dir."""
    from fft_dist.dist import broadcast_small
    from fft_dist.rundir import prepare_run_dir

    prepared = agree_on_config(prepared)
    error = None
    if ctx.is_main:
        try:
            prepare_run_dir(prepared.cfg, prepared.yaml)
        except ConfigError as e:
            error = str(e)
    error = broadcast_small(error)
    if error:
        raise ConfigError(error)
    return prepared


def _export(summary) -> int:
    from fft_dist.checkpoint import ExportTargetError, export_hf

    print(f"fft-dist: exporting {summary.export_source} to {summary.export}", flush=True)
    try:
        # a resumed run replaces its own earlier export (atomically); anything else there is refused
        export_hf(summary.export_source, summary.export, tokenizer_dir=summary.tokenizer_dir, run_id=summary.run_id)
    except ExportTargetError as e:
        report("export failed", e)
        return exit_codes.CONFIG_ERROR
    except CheckpointError as e:
        report("export failed", e)
        return exit_codes.CHECKPOINT_ERROR
    return exit_codes.OK


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _eval_line(summary) -> str:
    if not summary.eval_split:
        return "  eval loss: no eval split (set data.eval_path, or a data.eval_fraction that holds out rows)"
    if summary.first_eval_loss is None:
        return "  eval loss: none (stopped before the first evaluation)"
    return (f"  eval loss: first {_fmt(summary.first_eval_loss)} -> final {_fmt(summary.final_eval_loss)} "
            f"(best {_fmt(summary.best_eval_loss)} at step {summary.best_step})")


def print_summary(summary) -> None:
    print(
        "\n".join([
            "",
            f"fft-dist: {summary.stopped} after {summary.steps} steps in {summary.seconds:.1f} s",
            _eval_line(summary),
            *(f"  held-out {name}: loss {before:.4f} -> {after:.4f} ({after - before:+.4f})"
              for name, (before, after) in summary.held_out.items()),
            f"  run dir:    {summary.run_dir}  (config.yaml, metrics.jsonl, tb/)",
            f"  checkpoint: {summary.checkpoint or 'none'}",
            *([f"  HF export:  {summary.export} (from {summary.export_source})"] if summary.export_source else []),
            *([f"  stopped by {summary.signal}: rerun with resume=auto to continue"] if summary.signal else []),
        ]),
        flush=True,
    )


