"""Test hook (put this folder on PYTHONPATH): each rank stops just before it arms its death signal.

With FFT_DIST_TEST_PAUSE_DIR set, a rank (RANK in its environment) writes `paused-<pid>` there and
waits for a file `go`: the test kills the launcher in between, which makes the start-up race of
issue #15 item 6 (the launcher dies before a rank watches it) happen every time, not by chance.
"""
import os
import time

_dir = os.environ.get("FFT_DIST_TEST_PAUSE_DIR")
if _dir and "RANK" in os.environ:
    import fft_dist.preemption as _preemption

    _arm = _preemption.die_with_parent

    def _paused_die_with_parent():
        open(os.path.join(_dir, f"paused-{os.getpid()}"), "w").close()
        while not os.path.exists(os.path.join(_dir, "go")):
            time.sleep(0.02)
        _arm()

    _preemption.die_with_parent = _paused_die_with_parent
