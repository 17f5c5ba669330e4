"""A new launcher is one module plus one yaml: tests/support/toy_launcher.py registers a launcher through the
package's own registration point, and `fft-dist launch launcher=toy` describes it (dry run), refuses
the options it does not own, and runs it once (a real rank trains two steps)."""
from __future__ import annotations

import json
import os

import toy_launcher  # noqa: F401 - registers launcher=toy
from helpers import TINY_JOB, child_env, fft_dist, SUPPORT
from launch_checks import cli, TOY


def test_the_real_console_script_imports_a_launcher_named_in_fft_dist_plugins(tmp_path):
    """No fork: FFT_DIST_PLUGINS names the module, --config-dir holds its yaml."""
    env = child_env(FFT_DIST_PLUGINS="toy_launcher")
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env["PYTHONPATH"]])
    proc = fft_dist("launch", *TOY, *TINY_JOB, f"run.dir={tmp_path}", "launcher.dry_run=true", env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("# toy launcher"), proc.stderr[-3000:]
    proc = fft_dist("launch", *TOY, f"run.dir={tmp_path}", "launcher.dry_run=true")
    assert proc.returncode == 2 and "launcher.name='toy': no such launcher" in proc.stderr, proc.stderr[-3000:]


def test_the_toy_launcher_runs_a_real_rank_once(tmp_path, monkeypatch):
    from fft_dist.rundir import release_locks

    for key, value in child_env().items():  # what every test's child process gets (threads, offline hub)
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    try:
        code, out, err = cli("launch", *TOY, *TINY_JOB, f"run.dir={run}", "train.max_steps=2", "eval.every_steps=0")
    finally:
        release_locks()
    assert code == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert "toy launcher starting" in out
    assert "name: toy" in (run / "config.yaml").read_text()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps if "loss" in r) == 2, steps
