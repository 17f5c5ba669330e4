"""A stop signal that lands while the config is composed stays a stop (StartupInterrupted, exit 76); the
real signals to real jobs are in tests/e2e/test_launch_stops.py."""
from __future__ import annotations

import signal

import pytest


def test_a_stop_during_composition_stays_a_stop():
    """OmegaConf wraps or re-raises (as ``type(e)(message)``) what is raised inside it: a stop signal that
    lands while the config is composed must come out as the same StartupInterrupted (exit 76)."""
    from omegaconf import OmegaConf

    from fft_dist.preemption import StartupInterrupted

    def stop():
        raise StartupInterrupted(signal.SIGTERM)

    OmegaConf.register_new_resolver("test_stop_now", stop, replace=True)
    with pytest.raises(StartupInterrupted) as e:
        OmegaConf.create({"a": "${test_stop_now:}"}).a
    assert e.value.signum == signal.SIGTERM
    assert StartupInterrupted("SIGTERM\n    full_key: data.name").signum == signal.SIGTERM  # the re-raise form


def test_a_stop_whose_exception_was_swallowed_still_starts_no_rank(tmp_path, monkeypatch, capsys):
    """A handler's exception raised inside a finaliser or a weakref callback is printed and dropped by Python;
    the stop it recorded must still keep every rank from starting (exit 76, nothing saved). Were it lost, the
    launch would start torchrun's ranks here, which tests/unit's guard refuses."""
    from fft_dist import exit_codes, launch
    from helpers import TINY_JOB

    class SwallowedStop(launch.StopForwarder):
        def __init__(self):
            super().__init__()
            self.received = signal.SIGTERM  # as if _handle ran and its exception never reached the launch

    monkeypatch.setattr(launch, "StopForwarder", SwallowedStop)
    code = launch.train_command([*TINY_JOB, f"run.dir={tmp_path / 'run'}"])
    assert code == exit_codes.STOPPED_NO_CHECKPOINT
    assert "nothing trained, nothing saved" in capsys.readouterr().err
    checkpoints = tmp_path / "run" / "checkpoints"  # the run dir was prepared (the stop came after that check)
    assert not list(checkpoints.glob("step-*")) and not (checkpoints / "latest").exists()
