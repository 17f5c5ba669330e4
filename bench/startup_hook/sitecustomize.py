"""bench/startup.py's probe, imported by every Python process of a job (it is put on PYTHONPATH).

Each process appends "pid<TAB>event<TAB>seconds since STARTUP_T0" lines to STARTUP_LOG when it
starts and when the wrapped fft-dist functions begin or end. Functions are wrapped right after
their module is imported (a meta-path finder), so the package itself carries no timing code.
"""
import importlib.abc
import importlib.util
import os
import sys
import time

_LOG = os.environ.get("STARTUP_LOG")
_T0 = float(os.environ.get("STARTUP_T0", "0"))
_DONE = set()

# module -> [(attribute path, event name, when: "enter" | "exit" | "first_exit")]
PROBES = {
    "fft_dist.cli": [("main", "launcher: cli imported", "enter")],
    "fft_dist.launch": [("_resolve", "launcher: compose + validate", "exit"),
                        ("preflight", "launcher: preflight checks", "exit"),
                        ("start_agent", "launcher: torchrun agent starts", "enter"),
                        ("run_in_process", "launcher: rank runs in this process", "enter")],
    "fft_dist.rundir": [("prepare_run_dir", "launcher: run dir + config.yaml", "exit")],
    "fft_dist.rank": [("run_worker", "rank: imports done", "enter"),
                        ("load_worker_config", "rank: config loaded", "exit")],
    "fft_dist.dist": [("init_distributed", "rank: process group", "exit"),
                      ("exit_rank", "rank: exit", "enter")],
    "fft_dist.trainer": [("load_tokenizer", "rank: tokenizer", "exit"),
                         ("load_training_data", "rank: data (encode or cache)", "exit"),
                         ("make_strategy", "rank: strategy object", "exit"),
                         ("Trainer._build", "rank: model build + strategy setup", "exit"),
                         ("Trainer.train_step", "rank: first step done", "first_exit")],
}


def mark(event: str) -> None:
    if not _LOG:
        return
    line = f"{os.getpid()}\t{event}\t{time.time() - _T0:.4f}\n"
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _wrap(fn, event, when):
    def wrapper(*a, **k):
        if when == "enter":
            mark(event)
        try:
            return fn(*a, **k)
        finally:
            if when == "exit" or (when == "first_exit" and event not in _DONE):
                _DONE.add(event)
                mark(event)
    wrapper.__wrapped__ = fn
    return wrapper


def _patch(module) -> None:
    for path, event, when in PROBES.get(module.__name__, []):
        owner, _, attr = path.rpartition(".")
        target = getattr(module, owner) if owner else module
        if hasattr(target, attr):
            setattr(target, attr, _wrap(getattr(target, attr), event, when))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PROBES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
        loader.exec_module = exec_and_patch
        return spec


if _LOG:
    mark("python up: " + " ".join(os.path.basename(a) for a in sys.argv[:3]) if sys.argv else "python up")
    sys.meta_path.insert(0, _Finder())
