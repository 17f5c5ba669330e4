"""A new launcher is one module plus one yaml: tests/toy_launcher.py registers a launcher through the
package's own registration point, and `fft-dist launch launcher=toy` describes it (dry run), refuses
the options it does not own, and runs it once (a real rank trains two steps)."""
from __future__ import annotations

import json
import os

import toy_launcher  # noqa: F401 - registers launcher=toy
from helpers import REPO, TINY_JOB, child_env, fft_dist, SUPPORT
from test_one_config_path import cli
from fft_dist.launchers import REGISTRY

TOY = ["--config-dir", str(SUPPORT / "toy_conf"), "launcher=toy", "parallelism=none",
       "train.global_batch_size=2"]


def test_the_toy_launcher_is_registered_like_the_built_in_ones():
    assert REGISTRY["toy"] is toy_launcher.ToyLauncher
    assert {"local", "torchrun", "deepspeed", "slurm", "container"} <= set(REGISTRY)


def test_a_dry_run_prints_what_the_toy_launcher_would_run(tmp_path):
    code, out, err = cli("launch", *TOY, *TINY_JOB, f"run.dir={tmp_path}", "launcher.dry_run=true")
    assert code == 0, err
    assert out.startswith("# toy launcher") and out.rstrip().endswith("-m fft_dist.train"), out
    assert not (tmp_path / "config.yaml").exists(), "a dry run writes nothing"


def test_the_real_console_script_imports_a_launcher_named_in_fft_dist_plugins(tmp_path):
    """No fork: FFT_DIST_PLUGINS names the module, --config-dir holds its yaml."""
    env = child_env(FFT_DIST_PLUGINS="toy_launcher")
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env["PYTHONPATH"]])
    proc = fft_dist("launch", *TOY, *TINY_JOB, f"run.dir={tmp_path}", "launcher.dry_run=true", env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("# toy launcher"), proc.stderr[-3000:]
    proc = fft_dist("launch", *TOY, f"run.dir={tmp_path}", "launcher.dry_run=true")
    assert proc.returncode == 2 and "launcher.name='toy': no such launcher" in proc.stderr, proc.stderr[-3000:]


def test_fft_dist_plugins_takes_module_names_by_the_rule_loss_plugins_follows(tmp_path, monkeypatch):
    """One import rule for both sources (fft_dist.plugins): a path or code is refused, never imported."""
    for value in ("/tmp/evil.py", "os; rm -rf /"):
        monkeypatch.setenv("FFT_DIST_PLUGINS", value)
        code, _, err = cli("train", f"run.dir={tmp_path}", "--cfg", "job")
        assert code == 2 and f"FFT_DIST_PLUGINS: {value!r} is not an importable module name" in err, err


def test_an_option_the_toy_launcher_does_not_own_is_refused(tmp_path):
    code, _, err = cli("launch", *TOY, f"run.dir={tmp_path}", "launcher.nnodes=2", "launcher.dry_run=true")
    assert code == 2 and "launcher=toy does not use launcher.nnodes=2" in err, err


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
