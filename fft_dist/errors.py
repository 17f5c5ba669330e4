"""The errors a user can fix, and the exit code each one ends a run with (the table in the README and docs/reliability.md).

They live at the bottom of the import graph so that any layer can raise them; anything else that
escapes is a bug in fft-dist and keeps its traceback (exit 1).
"""
from __future__ import annotations

from fft_dist import exit_codes


class ConfigError(ValueError):
    """A configuration that cannot run. The message says what to change."""


class DataError(ValueError):
    """Bad or unusable data; the message names the file and line."""


class CheckpointError(RuntimeError):
    """A checkpoint (or model.path folder) that cannot be written, found or loaded; names the file or tensor."""


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing of that step is saved."""


def classify(error: BaseException) -> tuple[str, int] | None:
    """(what to call it, exit code) for an error the user can fix; None for a bug."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    table: list[tuple[tuple[type[BaseException], ...], str, int]] = [
        ((ConfigError, HydraException, OmegaConfBaseException), "config error", exit_codes.CONFIG_ERROR),
        ((DataError,), "data error", exit_codes.CONFIG_ERROR),
        ((CheckpointError,), "checkpoint error", exit_codes.CHECKPOINT_ERROR),
        ((NonFiniteError,), "error", exit_codes.NONFINITE_LOSS),
    ]
    for types, kind, code in table:
        if isinstance(error, types):
            return kind, code
    return None
