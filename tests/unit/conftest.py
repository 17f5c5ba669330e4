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


GUARD = pytest.StashKey[pytest.MonkeyPatch]()


# One guard per item from the start of its setup to the end of its teardown, so fixtures of any scope run
# under it, and a fixture's own monkeypatch (tests/unit/test_cluster_defaults.py fakes the process group
# call to read its arguments) layers on top and is undone first.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item.stash[GUARD] = _guarded()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        item.stash[GUARD].undo()
