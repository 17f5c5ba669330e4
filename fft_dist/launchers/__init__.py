"""One class per launcher (options, checks, world size, dry-run text, run), found by launcher.name.

Importing the package registers the built-in launchers; :func:`register` is the one registration
point, for them and for a launcher of one's own (plus its ``conf/launcher/<name>.yaml``).
"""
from fft_dist.launchers.base import (CONFIG_ENV, REGISTRY, STOPPED_ENV, Job, Launcher, check_launcher, import_plugins,
                                     launcher_for, register)
from fft_dist.launchers import container, deepspeed, local, slurm, torchrun  # noqa: F401 - they register

__all__ = ["CONFIG_ENV", "REGISTRY", "STOPPED_ENV", "Job", "Launcher", "check_launcher", "import_plugins",
           "launcher_for", "register"]
