"""`fft-dist` console script: train | launch | node | data | estimate | plan | export | ckpt."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USAGE = """fft-dist <command> [args]

commands:
  train [hydra overrides]        train; self-launches launcher.nproc_per_node ranks via torchrun's API
                                 (fft-dist train --help lists every option; --cfg job prints the config;
                                 -m a=1,2 b=x,y runs every combination, each in run.dir/<n>)
  launch [hydra overrides]       run or submit the job with launcher=local|torchrun|deepspeed|slurm|container
                                 (launcher.dry_run=true prints the command or sbatch script, runs nothing;
                                 launcher.dry_run=write also writes config.yaml and the script, to run by hand)
  node [torchrun args]           one node's agent for a written config (FFT_DIST_CONFIG); sbatch scripts use it
  export <checkpoint> <out_dir>  write a Hugging Face folder from a checkpoint (--force replaces a
                                 non-empty out_dir; <checkpoint>: step-N, the checkpoint root or latest)
  estimate [overrides] [--gpus 1,2,8] [--gpu-mem 80GiB] [--headroom 10%] [--json]
                                 per-GPU memory of every backend at each GPU count (model on meta)
  plan --gpus N --gpu-mem M [--headroom 10%] [overrides]
                                 the cheapest set-up that fits, with the overrides to paste
  data [hydra overrides]         print what the data turns into (splits, lengths, truncation, loss mask,
                                 data.inspect_terms=[...] token splits); trains nothing
  ckpt verify <checkpoint>       check completeness and sha256 checksums
  ckpt info <checkpoint>         step, backend, world size, tensors, bytes
"""


def train(argv: list[str], *, command: str = "train") -> int:
    """`fft-dist train|launch`: Hydra-style flags first (--help, --cfg job, --info, --config-dir), then launch."""
    from fft_dist import config_help
    from fft_dist.launch import launch_command, train_command

    overrides, config_dirs, show, multirun = [], [], None, False
    it = iter(argv)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
            continue
        if arg in ("-h", "--help"):
            print(config_help.help_text())
            return 0
        if arg in ("--cfg", "-c"):
            show = next(it, "job")
        elif arg.startswith("--cfg="):
            show = arg.split("=", 1)[1]
        elif arg == "--info":
            show = "info"
        elif arg == "--config-dir" or arg.startswith("--config-dir="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if not value or not Path(value).is_dir():
                print(f"fft-dist: --config-dir {value!r} is not a folder", file=sys.stderr)
                return 2
            config_dirs.append(value)
        else:
            overrides.append(arg)
    if show == "info":
        print(config_help.info_text(config_dirs))
        return 0
    if show is not None:
        if multirun:
            print("fft-dist: --cfg shows one job's config; drop -m", file=sys.stderr)
            return 2
        return print_config(overrides, config_dirs, show)
    if multirun:
        from fft_dist.sweep import run_sweep

        return run_sweep(command, overrides, config_dirs=config_dirs)
    if command == "launch":
        return launch_command(overrides, config_dirs=config_dirs)
    return train_command(overrides, config_dirs=config_dirs)


def print_config(overrides: list[str], config_dirs: list[str], what: str) -> int:
    """`--cfg job`: the composed and resolved config, exactly what config.yaml would hold."""
    from fft_dist.compose import prepare, report_known

    if what not in ("job", "all"):
        print(f"fft-dist: --cfg {what!r}: use --cfg job", file=sys.stderr)
        return 2
    try:
        prepared = prepare(overrides, config_dirs=config_dirs)
        check_registered_names(prepared.cfg)
    except Exception as e:  # noqa: BLE001 - a known error gets its message and code; a bug re-raises
        return report_known(e)
    print(prepared.yaml, end="")
    return 0


def check_registered_names(cfg) -> None:
    """What composing cannot know, since plugins may register it: the loss terms and the data format
    (the launcher's preflight checks the same, so `--cfg job` refuses what `launch` refuses)."""
    from fft_dist.data.formats import get_format
    from fft_dist.loss import check as check_loss

    check_loss(cfg.loss, fmt=cfg.data.format)  # imports loss.plugins first
    get_format(cfg.data.format)


def data(argv: list[str]) -> int:
    """`fft-dist data [overrides]`: the data report on stdout, exit 0; a data or config error exits 2.

    The tokenised cache goes to data.cache_dir when it is set, else to a temporary folder.
    """
    from fft_dist.compose import prepare, report_known

    try:
        cfg = prepare([a for a in argv if a != "--"]).cfg
        check_registered_names(cfg)  # and a plugin's data format is registered before the data is read
        from fft_dist.data import check_data_files
        from fft_dist.data.report import data_report
        from fft_dist.model import load_tokenizer

        check_data_files(cfg.data)
        text = data_report(cfg.data, load_tokenizer(cfg.model), cache_dir=cfg.data.cache_dir)
    except Exception as e:  # noqa: BLE001 - a known error gets its message and code; a bug re-raises
        return report_known(e)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> None:
    """The console script. Output to a pipe whose reader has gone (`fft-dist ckpt info x | head -1`) ends
    quietly with exit 0: the reader has what it wanted, and a traceback would only hide that."""
    try:
        try:
            code = _dispatch(sys.argv[1:] if argv is None else argv)
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe is an unhandled error
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # later writes (at exit) go nowhere
        code = 0
    sys.exit(code)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("train", "launch"):
        return train(rest, command=command)
    if command == "node":
        from fft_dist.launch import node_command

        return node_command(rest)
    commands = {"data": data, "export": export, "ckpt": ckpt, "estimate": estimate, "plan": plan}
    if command in commands:
        return commands[command](rest)
    print(f"fft-dist: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


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
    from fft_dist.checkpoint.interpolate import InterpolationUsageError
    from fft_dist.exit_codes import CHECKPOINT_ERROR, CONFIG_ERROR

    p = argparse.ArgumentParser(prog="fft-dist export")
    p.add_argument("checkpoint", type=Path, help="a step-N folder, a checkpoint root or its 'latest' file")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="2GB", type=_shard_size, help="e.g. 2GB, 500MB, 1GiB")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder (default: the checkpoint's own tokenizer/ copy)")
    p.add_argument("--force", action="store_true", help="replace a non-empty out_dir (atomically, when complete)")
    p.add_argument("--interpolate-base", type=float, default=None, metavar="ALPHA",
                   help="write (1 - ALPHA) * trained + ALPHA * base weights, ALPHA in [0, 1] (trades task skill for "
                        "what the base model knew); needs --base")
    p.add_argument("--base", type=Path, default=None,
                   help="the Hugging Face folder the run started from (its model.path), for --interpolate-base")
    a = p.parse_args(argv)
    if a.base is not None and a.interpolate_base is None:
        p.error("--base is only used with --interpolate-base")
    try:
        export_hf(a.checkpoint, a.out_dir, dtype=a.dtype, max_shard_size=a.max_shard_size, tokenizer_dir=a.tokenizer,
                  overwrite=a.force, interpolate_base=a.interpolate_base, base=a.base)
    except (ExportTargetError, InterpolationUsageError) as e:
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
            problems = verify_checkpoint(a.checkpoint) or _trainer_state_problems(a.checkpoint)
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


def _trainer_state_problems(checkpoint: Path) -> list[str]:
    """The fft-dist trainer's own sections of the train state, when the trainer wrote them (any of
    trainer / sampler / schedule present); other writers' train states are opaque to `verify`."""
    from fft_dist.checkpoint import CheckpointError, read_train_state, resolve_checkpoint
    from fft_dist.checkpoint.format import TRAIN_STATE_FILE
    from fft_dist.train_state import parse_trainer_state

    path = resolve_checkpoint(checkpoint)
    saved = read_train_state(path)["train_state"]
    if not {"trainer", "sampler", "schedule"} & set(saved):
        return []
    try:
        parse_trainer_state(saved, str(path / TRAIN_STATE_FILE))
    except CheckpointError as e:
        return [str(e)]
    return []


def _headroom(text: str) -> float:
    """argparse type for --headroom: '10%' or a fraction such as 0.1 (a bare 10 is ambiguous: refused)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use a share of the budget below 100%, e.g. 10% or 0.1")
    return value


def _sizing_args(prog: str, argv: list[str], *, plan: bool):
    """Flags of `estimate` / `plan`; everything else is a Hydra override."""
    from fft_dist.memory import HEADROOM, USABLE

    p = argparse.ArgumentParser(prog=prog)
    if plan:
        p.add_argument("--gpus", type=int, required=True, help="GPUs to train on")
        p.add_argument("--gpu-mem", type=_shard_size, required=True, help="memory of one GPU, e.g. 80GiB")
    else:
        p.add_argument("--gpus", default="1,2,4,8", help="comma-separated GPU counts (default 1,2,4,8)")
        p.add_argument("--gpu-mem", type=_shard_size, default=None, help="memory of one GPU, e.g. 80GiB: marks what fits")
        p.add_argument("--json", action="store_true", help="print one JSON list of rows")
    p.add_argument("--headroom", type=_headroom, default=None,
                   help=f"share of the budget ({USABLE:.0%} of --gpu-mem) left free for what the estimate does not see "
                        f"(default {HEADROOM:.0%}; 0 fills the budget)")
    p.add_argument("--config-dir", action="append", default=[], help="extra folder of config groups")
    return p.parse_known_args(argv)


def _load_for_sizing(overrides: list[str], config_dirs: list[str]):
    """The composed training config and the model's shape, or (None, exit code) after reporting."""
    from fft_dist.compose import report_known, typed
    from fft_dist.device_defaults import check
    from fft_dist.memory import model_shape

    try:
        cfg = typed(overrides, config_dirs=config_dirs)[0]  # the one path, before validation: sizes many worlds
        check(cfg)  # a bad true/false/auto value: exit 2 here too
        return cfg, model_shape(cfg)
    except Exception as e:  # noqa: BLE001 - a known error gets its message and code; a bug re-raises
        return None, report_known(e)


def estimate(argv: list[str]) -> int:
    """`fft-dist estimate`: exit 0, or 2 on a bad flag / config."""
    import json

    from fft_dist.memory import HEADROOM, assumptions, estimate_table, format_table
    from fft_dist.planner import budget_text

    a, overrides = _sizing_args("fft-dist estimate", argv, plan=False)
    try:
        gpus = [int(x) for x in a.gpus.split(",") if x.strip()]
        if not gpus or min(gpus) < 1:
            raise ValueError
    except ValueError:
        print(f"fft-dist estimate: --gpus {a.gpus!r}: use positive GPU counts, e.g. --gpus 1,2,8", file=sys.stderr)
        return 2
    cfg, shape = _load_for_sizing(overrides, a.config_dir)
    if cfg is None:
        return shape
    if a.gpu_mem is None and a.headroom is not None:
        print("fft-dist estimate: --headroom marks what fits in --gpu-mem: give --gpu-mem too", file=sys.stderr)
        return 2
    a.headroom = HEADROOM if a.headroom is None else a.headroom
    rows = estimate_table(cfg, shape, gpus, gpu_mem=a.gpu_mem, headroom=a.headroom)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    evals = rows[0]["eval_micro_batch_size"] if rows else 0
    print(f"{cfg.model.name}: {shape.params:,} parameters ({shape.trainable:,} trainable), vocabulary {shape.vocab:,}, "
          f"{assumptions(cfg)}, optimizer {cfg.optimizer.name.value}, micro batch "
          f"{cfg.train.micro_batch_size} x {cfg.data.max_length} tokens, "
          + (f"eval micro batch {evals}" if evals else "no eval set") + ", activation checkpointing "
          f"{'on' if cfg.model.activation_checkpointing else 'off'}. GiB per GPU; activations: the larger of train "
          "(saved for backward) and eval (one eval forward); tr+AC / tr-AC: train with checkpointing toggled; cpu: "
          "offload memory per GPU; stage: host memory per GPU of checkpoint.async_save's staging buffer (a copy of the "
          "rank's fp32 weights and optimizer states; not in total)" + (f"; fits: within {budget_text(a.gpu_mem, a.headroom)}" if a.gpu_mem else "")
          + " (README: Memory planning):")
    print(format_table(rows, a.gpu_mem))
    return 0


def plan(argv: list[str]) -> int:
    """`fft-dist plan`: exit 0 with a plan, 2 on a bad flag / config or when nothing fits."""
    from fft_dist.memory import HEADROOM
    from fft_dist.planner import NoFit, best_plan, format_plan

    a, overrides = _sizing_args("fft-dist plan", argv, plan=True)
    a.headroom = HEADROOM if a.headroom is None else a.headroom
    if a.gpus < 1:
        print(f"fft-dist plan: --gpus {a.gpus}: use 1 or more", file=sys.stderr)
        return 2
    cfg, shape = _load_for_sizing(overrides, a.config_dir)
    if cfg is None:
        return shape
    try:
        choice = best_plan(cfg, shape, gpus=a.gpus, gpu_mem=a.gpu_mem, headroom=a.headroom)
    except NoFit as e:
        print(f"fft-dist plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(choice))
    return 0


if __name__ == "__main__":
    main()
