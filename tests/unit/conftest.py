"""The guard that keeps tests/unit in-process: a unit test (or a fixture it uses, whatever its scope) that
starts a process (subprocess, fork, multiprocessing, os.system) or a torch.distributed process group fails
at that call, naming it.

Such a test belongs in tests/e2e. The guard wraps the calls only to refuse them; it fakes nothing."""
from __future__ import annotations

import multiprocessing.process
import os
import subprocess

import pytest


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"a unit test may not {what}: tests/unit runs in this process only; "
                             "a test that starts processes or a process group goes in tests/e2e")
    return refused


def _guarded() -> pytest.MonkeyPatch:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    patch = pytest.MonkeyPatch()
    patch.setattr(subprocess.Popen, "__init__", _refuse("start a subprocess"))
    patch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("start a multiprocessing process"))
    for name, what in (("fork", "fork"), ("system", "run os.system"), ("posix_spawn", "posix_spawn a process")):
        if hasattr(os, name):
            patch.setattr(os, name, _refuse(what))
    patch.setattr(dist, "init_process_group", _refuse("init a torch.distributed process group"))
    patch.setattr(c10d, "init_process_group", _refuse("init a torch.distributed process group"))
    return patch


@pytest.hookimpl(wrapper=True)
def in_process_only():
    """Wraps each phase of every item under tests/unit (fixtures of any scope run in setup and teardown)."""
    patch = _guarded()
    try:
        return (yield)
    finally:
        patch.undo()


pytest_runtest_setup = pytest_runtest_call = pytest_runtest_teardown = in_process_only
