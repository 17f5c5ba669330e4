"""Process exit codes, documented in the README and docs/reliability.md (scripts and SLURM requeue logic rely on them)."""

OK = 0
BUG = 1
"""An unexpected error in fft-dist itself: its traceback is printed. Please report it."""
CONFIG_ERROR = 2
"""Bad configuration or data; nothing was trained."""
NONFINITE_LOSS = 3
"""The loss or gradient norm became NaN/inf; no update of that step was applied and no checkpoint of it written."""
CHECKPOINT_ERROR = 4
"""A checkpoint or pretrained folder is missing, truncated, corrupt or mismatched; nothing was written."""
PREEMPTED = 75
"""A stop signal arrived; the ranks finished the current step and wrote a checkpoint: rerun with resume=auto."""
STOPPED_NO_CHECKPOINT = 76
"""A stop signal arrived before any rank started training: nothing was trained and nothing was saved."""

DOCUMENTED = frozenset({OK, BUG, CONFIG_ERROR, NONFINITE_LOSS, CHECKPOINT_ERROR, PREEMPTED, STOPPED_NO_CHECKPOINT})
