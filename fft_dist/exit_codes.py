"""Process exit codes, documented in the README (scripts and SLURM requeue logic rely on them)."""

OK = 0
CONFIG_ERROR = 2
"""Bad configuration or data; nothing was trained."""
NONFINITE_LOSS = 3
"""The loss became NaN/inf; the last good checkpoint is kept and no newer one is written."""
CHECKPOINT_ERROR = 4
"""A checkpoint or pretrained folder is missing, truncated, corrupt or mismatched; nothing was written."""
PREEMPTED = 75
"""SIGTERM/SIGUSR1 arrived: the current step finished, a checkpoint was written; rerun with resume=auto."""
