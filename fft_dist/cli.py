"""`fft-dist` console script: train | export | ckpt."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USAGE = """fft-dist <command> [args]

commands:
  train [hydra overrides]        train; self-launches launcher.nproc_per_node ranks via torchrun's API
  export <checkpoint> <out_dir>  write a Hugging Face folder from a checkpoint
  ckpt verify <checkpoint>       check completeness and sha256 checksums
  ckpt info <checkpoint>         step, backend, world size, tensors, bytes
"""


def train(overrides: list[str]) -> int:
    """Resolve the config once, write run.dir/config.yaml, then start the ranks (or be one)."""
    from fft_dist.dist import launched_by_launcher, strip_launcher_args
    from fft_dist.exit_codes import CONFIG_ERROR
    from fft_dist.train import run_worker

    overrides = strip_launcher_args(overrides)
    if launched_by_launcher():
        return run_worker(overrides)
    from fft_dist.config import compose, describe_error, resolve, to_typed, to_yaml, validate

    try:
        cfg_node = resolve(compose(overrides))
        cfg = to_typed(cfg_node)
        nproc = cfg.launcher.nproc_per_node
        validate(cfg, nproc)
    except Exception as e:
        print(f"fft-dist: config error: {describe_error(e)}", file=sys.stderr)
        return CONFIG_ERROR
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(to_yaml(cfg_node), encoding="utf-8")
    print(f"fft-dist: run dir {run_dir}; starting {nproc} rank(s)", flush=True)
    return launch_local(config_path, nproc, cfg.launcher.master_port)


def launch_local(config_path: Path, nproc: int, master_port: int) -> int:
    """Start `nproc` workers with torch.distributed.run (torchrun's own code, not a home-made spawner)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from fft_dist.train import CONFIG_ENV
    from fft_dist.exit_codes import PREEMPTED

    os.environ[CONFIG_ENV] = str(config_path)
    # Forward SLURM's pre-emption signal (USR1) to the workers too; they checkpoint and exit.
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    rdzv = ["--standalone"] if master_port == 0 else ["--master_addr", "127.0.0.1", "--master_port", str(master_port)]
    args = get_args_parser().parse_args(
        ["--nproc_per_node", str(nproc), *rdzv, "--max_restarts", "0", "--monitor_interval", "0.5",
         "-m", "fft_dist.train"]
    )
    try:
        run(args)
    except SignalException as e:
        print(f"fft-dist: received {e.sigval.name}; the ranks were asked to checkpoint and stop "
              f"(resume with resume=auto)", file=sys.stderr)
        return PREEMPTED
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        code = next((c for c in codes if c and c > 0), 1)
        print(f"fft-dist: a rank exited with code {code}; see the messages above", file=sys.stderr)
        return code
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        sys.exit(train(rest))
    if command == "export":
        sys.exit(export(rest))
    if command == "ckpt":
        sys.exit(ckpt(rest))
    print(f"fft-dist: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    sys.exit(2)


def _shard_size(text: str) -> int:
    """argparse type for --max-shard-size: a bad value is a usage error (exit 2), not a traceback."""
    from fft_dist.checkpoint.format import parse_size

    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return size


def export(argv: list[str]) -> int:
    """Exit 0 ok, 2 usage error (bad option, non-empty output folder without --force), 4 bad checkpoint."""
    from fft_dist.checkpoint import CheckpointError, ExportTargetError, export_hf
    from fft_dist.exit_codes import CHECKPOINT_ERROR, CONFIG_ERROR

    p = argparse.ArgumentParser(prog="fft-dist export")
    p.add_argument("checkpoint", type=Path, help="a step-N folder, a checkpoint root or its 'latest' file")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="2GB", type=_shard_size, help="e.g. 2GB, 500MB, 1GiB")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the one the run used)")
    p.add_argument("--force", action="store_true", help="replace a non-empty out_dir (atomically, when complete)")
    a = p.parse_args(argv)
    try:
        export_hf(a.checkpoint, a.out_dir, dtype=a.dtype, max_shard_size=a.max_shard_size, tokenizer_dir=a.tokenizer,
                  overwrite=a.force)
    except ExportTargetError as e:
        print(f"fft-dist: {e}", file=sys.stderr)
        return CONFIG_ERROR
    except CheckpointError as e:
        print(f"fft-dist: {e}", file=sys.stderr)
        return CHECKPOINT_ERROR
    print(f"fft-dist: wrote {a.out_dir}")
    return 0


def ckpt(argv: list[str]) -> int:
    """Exit 0 ok, 2 usage error, 4 when the checkpoint is missing, incomplete, corrupt or malformed."""
    import json

    from fft_dist.checkpoint import CheckpointError, checkpoint_info, resolve_checkpoint, verify_checkpoint
    from fft_dist.exit_codes import CHECKPOINT_ERROR

    p = argparse.ArgumentParser(prog="fft-dist ckpt")
    p.add_argument("action", choices=["verify", "info"])
    p.add_argument("checkpoint", type=Path, help="a step-N folder, a checkpoint root or its 'latest' file")
    a = p.parse_args(argv)
    try:
        if a.action == "verify":
            problems = verify_checkpoint(a.checkpoint)
            for problem in problems:
                print(f"fft-dist: {problem}", file=sys.stderr)
            if problems:
                return CHECKPOINT_ERROR
            print(f"fft-dist: {resolve_checkpoint(a.checkpoint)} is complete and every checksum matches")
            return 0
        print(json.dumps(checkpoint_info(a.checkpoint), indent=2))
        return 0
    except CheckpointError as e:
        print(f"fft-dist: {e}", file=sys.stderr)
        return CHECKPOINT_ERROR


if __name__ == "__main__":
    main()
