"""bench/gpu_smoke.py's sync counter, imported by every Python process of a smoke job (on PYTHONPATH).

In a rank, once `fft_dist.dist.init_distributed` has picked the rank's GPU, CUDA's sync debug mode
is set to "warn" (torch.cuda.set_sync_debug_mode): every operation that makes the host wait for the
GPU (.item(), .cpu(), .tolist(), a blocking copy) raises a warning. They are counted, not printed,
and each `Trainer.train_step` appends "rank<TAB>step<TAB>syncs in the step<TAB>syncs so far" to
SMOKE_SYNC_LOG. The package carries no counting code: functions are wrapped right after their module
is imported, as bench/startup_hook does.
"""
import importlib.abc
import importlib.util
import os
import sys
import warnings

_LOG = os.environ.get("SMOKE_SYNC_LOG")
_MESSAGE = "called a synchronizing CUDA operation"
_count = [0]
_step = [0]


def _counting_showwarning(show):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _MESSAGE in str(message):
            _count[0] += 1
            return
        show(message, category, filename, lineno, file, line)
    return showwarning


def _after_init(fn):
    def init_distributed(*a, **k):
        ctx = fn(*a, **k)
        import torch

        if ctx.device.type == "cuda":  # after set_device: the mode's lazy init must not touch GPU 0
            warnings.filterwarnings("always", message=_MESSAGE)  # every sync, not one per code line
            warnings.showwarning = _counting_showwarning(warnings.showwarning)
            torch.cuda.set_sync_debug_mode("warn")
        return ctx
    return init_distributed


def _count_step(fn):
    def train_step(self, *a, **k):
        before = _count[0]
        try:
            return fn(self, *a, **k)
        finally:
            _step[0] += 1
            line = f"{os.environ.get('RANK', '0')}\t{_step[0]}\t{_count[0] - before}\t{_count[0]}\n"
            fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
    return train_step


def _patch(module) -> None:
    if module.__name__ == "fft_dist.dist":
        module.init_distributed = _after_init(module.init_distributed)
    elif module.__name__ == "fft_dist.trainer":
        module.Trainer.train_step = _count_step(module.Trainer.train_step)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in ("fft_dist.dist", "fft_dist.trainer"):
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
        spec.loader.exec_module = exec_and_patch
        return spec


if _LOG:
    sys.meta_path.insert(0, _Finder())
