"""Worker entry point: one process = one rank. Also `python -m fft_dist.train [overrides]`.

Under torchrun or the deepspeed launcher this is the worker. Every rank uses the single
resolved config: the file named by FFT_DIST_CONFIG (written by `fft-dist train`), or, when a
user calls the launcher directly, rank 0's resolved composition broadcast to the others.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fft_dist.config import ConfigError, FFTConfig, compose, describe_error, load_yaml, resolve, to_typed, to_yaml, validate
from fft_dist import exit_codes
from fft_dist.dist import barrier, broadcast_small, env_world_size, init_distributed, print0, strip_launcher_args

CONFIG_ENV = "FFT_DIST_CONFIG"


def load_config(argv: list[str]) -> tuple[FFTConfig, str, bool]:
    """(typed config, resolved YAML, came_from_file). Raises ConfigError or Hydra errors."""
    path = os.environ.get(CONFIG_ENV)
    if path:
        if argv:
            raise ConfigError(f"{CONFIG_ENV}={path} is set, so command-line overrides {argv} would be ignored")
        text = Path(path).read_text(encoding="utf-8")
        return load_yaml(path), text, True
    cfg = resolve(compose(argv))
    return to_typed(cfg), to_yaml(cfg), False


def run_worker(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from fft_dist.checkpoint import CheckpointError
    from fft_dist.config import to_typed as typed_from
    from fft_dist.data import DataError
    from fft_dist.trainer import NonFiniteLossError, Trainer

    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg, text, from_file = load_config(argv)
        plan = validate(cfg, env_world_size())
    except Exception as e:  # config errors are identical on every rank: report once
        if rank == 0:
            print(f"fft-dist: config error: {describe_error(e)}", file=sys.stderr, flush=True)
        return exit_codes.CONFIG_ERROR
    ctx = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        if not from_file:
            text = broadcast_small(text)  # rank 0's resolution wins: ${now:} cannot differ between ranks
            cfg = typed_from(OmegaConf.create(text))
        run_dir = Path(cfg.run.dir)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not from_file:
                (run_dir / "config.yaml").write_text(text, encoding="utf-8")
        summary = Trainer(cfg, ctx=ctx, plan=plan, run_dir=run_dir, config_yaml=text).run()
        barrier()  # rank 0 may still be exporting; gloo can abort if the group goes away mid-flight
    except (ConfigError, DataError) as e:
        print(f"fft-dist: error{'' if ctx.world_size == 1 else f' (rank {ctx.rank})'}: {e}", file=sys.stderr, flush=True)
        return exit_codes.CONFIG_ERROR
    except CheckpointError as e:
        print(f"fft-dist: checkpoint error{'' if ctx.world_size == 1 else f' (rank {ctx.rank})'}: {e}",
              file=sys.stderr, flush=True)
        return exit_codes.CHECKPOINT_ERROR
    except NonFiniteLossError as e:
        print0(f"fft-dist: error: {e}", file=sys.stderr)
        return exit_codes.NONFINITE_LOSS
    finally:
        _shutdown()
    if ctx.is_main:
        print_summary(summary)
    return exit_codes.PREEMPTED if summary.stopped == "preempted" else exit_codes.OK


def _shutdown() -> None:
    from fft_dist.dist import destroy

    destroy()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def print_summary(summary) -> None:
    print(
        "\n".join([
            "",
            f"fft-dist: {summary.stopped} after {summary.steps} steps in {summary.seconds:.1f} s",
            f"  eval loss: first {_fmt(summary.first_eval_loss)} -> final {_fmt(summary.final_eval_loss)} "
            f"(best {_fmt(summary.best_eval_loss)} at step {summary.best_step})",
            f"  run dir:    {summary.run_dir}  (config.yaml, metrics.jsonl, tb/)",
            f"  checkpoint: {summary.checkpoint or 'none'}",
            *([f"  HF export:  {summary.export}"] if summary.export else []),
        ]),
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    sys.exit(run_worker(argv))


if __name__ == "__main__":
    main()
