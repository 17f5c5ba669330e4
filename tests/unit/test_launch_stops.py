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
