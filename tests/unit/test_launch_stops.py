"""Launching for real: stop signals to the launcher, the process group or one rank; kill -9 of the
launcher; one run per run directory; never on top of another run's checkpoints.

Every case runs the real `fft-dist train` (a launcher process plus 2 gloo ranks) and checks the
exit code, the checkpoint on disk and that no process of the job is left.
"""
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
