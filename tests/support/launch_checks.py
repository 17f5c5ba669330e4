"""Launch helpers: `fft-dist launch ... launcher.dry_run=true` and the console script called in this process,
reading generated commands and scripts, and the shared option lists. Moved unchanged from
tests/test_launchers.py, test_launch_single.py, test_launch_quoting.py, test_launcher_extension.py and
test_one_config_path.py when the tests were split into unit/ and e2e/ (issue 18), so that no test file imports
another and nothing is copied. Used by e2e/test_cluster_defaults.py, e2e/test_launch_dry_runs.py,
e2e/test_launch_local.py, e2e/test_launch_quoting.py, e2e/test_launch_slurm.py, e2e/test_launch_stops.py,
e2e/test_launcher_extension.py, unit/test_cluster_defaults.py, unit/test_data_checks.py,
unit/test_launch_options.py, unit/test_launch_quoting.py, unit/test_launcher_extension.py,
unit/test_model_checks.py, unit/test_one_config_path.py."""
from __future__ import annotations

import contextlib
import io
import signal
import os
import subprocess
from pathlib import Path
import shlex

from fft_dist.preemption import STOP_SIGNALS
from helpers import children, fft_dist, TINY_JOB, SUPPORT


def cli(*argv: str) -> tuple[int, str, str]:
    """The console script in this process (no ranks start: each call here refuses or prints)."""
    from fft_dist.cli import main

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code, out.getvalue(), err.getvalue()


SINGLE = ["parallelism=none", "launcher.nproc_per_node=1", "train.global_batch_size=2"]


ODD = "/tmp/fft dist's $HOME run"  # a space, a quote and a $: must reach the ranks unchanged


def dry(*overrides: str) -> subprocess.CompletedProcess:
    """`fft-dist launch ... launcher.dry_run=true` in this process (a dry run starts nothing; seconds saved)."""
    code, out, err = cli("launch", *overrides, "launcher.dry_run=true")
    return subprocess.CompletedProcess(["fft-dist", "launch", *overrides], code, out, err)


def dry_ok(*overrides: str) -> str:
    proc = dry(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def bash_syntax_ok(text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, f"bash -n: {proc.stderr}\n{text}"


def last_line_words(text: str) -> list[str]:
    line = [ln for ln in text.splitlines() if ln and not ln.startswith("#")][-1]
    bash_syntax_ok(line)
    return shlex.split(line)


def flag(words: list[str], name: str) -> str:
    """The value of option `name`, given in the attached form `--name=value` (never as a separate word)."""
    assert name not in words, f"{name} followed by a separate value word: {words}"
    return next(w.split("=", 1)[1] for w in words if w.startswith(name + "="))


def slurm_script(*overrides: str) -> str:
    text = dry_ok("launcher=slurm", *overrides)
    assert text.startswith("#!/bin/bash\n")
    bash_syntax_ok(text)
    return text


def launch(run: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = fft_dist("launch", f"run.dir={run}", *TINY_JOB, *overrides, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def kill_job(proc: subprocess.Popen) -> None:
    """Never leave a job behind when a test fails: its ranks first, then the launcher."""
    if proc.poll() is None:
        for pid in children(proc.pid):
            os.kill(pid, 9)
        proc.kill()
        proc.communicate()


SLURM = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2"]


def hydra_quoted(value: str) -> str:
    """A Hydra override value that composes to `value` (its grammar escapes quotes, not ours)."""
    return "'" + value.replace("'", "\\'") + "'"


TOY = ["--config-dir", str(SUPPORT / "toy_conf"), "launcher=toy", "parallelism=none",
       "train.global_batch_size=2"]
