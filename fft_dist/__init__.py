"""fft-dist: distributed full-parameter fine-tuning.

Layers, bottom to top. A module imports only from its own layer or the ones below it (lazy
imports inside functions included), and no two modules import each other; `tests/unit/test_layers.py`
enforces both. The data flows up: typed config -> components -> the loop -> one rank -> launcher.
"""
__version__ = "0.1.0"

LAYERS: list[list[str]] = [
    ["exit_codes", "errors", "plugins"],             # what can go wrong; modules of your own, one import rule
    ["config"],                                      # the typed schema, one module per section
    ["processes"],                                   # which process is which (pid + start time)
    ["device_defaults"],                             # what each `auto` becomes on a rank's device
    ["validate", "config_help", "preemption", "dist"],  # pure rules, processes
    ["launchers"],                                   # one class per launcher: options, checks, world size, run
    ["models", "model_checks", "model", "optim", "metrics", "progress", "data", "loss"],  # components built from typed config; model families
    ["strategy"],                                    # FSDP2 / DeepSpeed / single process behind one protocol
    ["compose"],                                     # the one compose -> type -> validate path (the launcher's
    #                                                  checks see the chosen backend's descriptor)
    ["memory", "planner"],                           # will it fit: per-GPU bytes, the cheapest set-up that fits
    ["checkpoint"],                                  # one format over every strategy's fragments
    ["trainer", "run_checkpoints", "train_state", "rundir", "locks", "evaluation", "reference"],  # the loop, a run's
    #                                                  checkpoints, its saved state's spec, the run directory and
    #                                                  its locks (flock or a lease), eval losses
    ["rank"],                                        # one rank's life (python -m fft_dist.train runs it)
    ["launch", "sweep"],                             # the train/launch/node commands: check, start or submit
    ["cli", "train"],                                # entry points
]
