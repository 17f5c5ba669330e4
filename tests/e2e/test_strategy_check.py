"""fft_dist.strategy.check: every parallelism option does something under the chosen backend or is refused
before any rank starts, with a message that names the option. Fast: no processes except the import test."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_config_does_not_import_the_strategy_package():
    code = ("import sys, fft_dist.config; "
            "bad = [m for m in sys.modules if m.startswith('fft_dist.strategy')]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_check_imports_no_backend():
    """check() runs in the launcher: no DeepSpeed, transformers or FSDP import."""
    code = ("import sys; from fft_dist.strategy import check; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'transformers') "
            "or m.startswith('torch.distributed.fsdp')]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
