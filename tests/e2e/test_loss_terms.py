"""The loss as a component: terms normalised in one place, the registry, and a user's own term added
from tests/support/plugins through loss.plugins (the same register_term the built-in router term uses)."""
from __future__ import annotations

import json
import os
import sys

from helpers import TINY_JOB, child_env, fft_dist
from loss_terms_shared import PLUGINS


sys.path.insert(0, str(PLUGINS))


def plugin_env() -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), env["PYTHONPATH"]])
    return env


def test_a_users_term_from_a_plugin_module_runs_on_two_ranks_and_is_logged(tmp_path):
    run = tmp_path / "run"
    proc = fft_dist("train", f"run.dir={run}", "parallelism=fsdp", "launcher.nproc_per_node=2", *TINY_JOB,
                    "train.max_steps=2", "loss.plugins=[toy_loss_terms]", "+loss.terms.z_loss={weight:0.001}",
                    env=plugin_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2 and all(r["loss/z_loss"] > 0 for r in steps), steps


def test_a_plugin_path_is_refused_before_anything_runs(tmp_path):
    proc = fft_dist("train", "--cfg", "job", f"run.dir={tmp_path / 'run'}", "loss.plugins=[/tmp/evil.py]", timeout=120)
    assert proc.returncode == 2 and "loss.plugins: '/tmp/evil.py' is not an importable module name" in proc.stderr, \
        proc.stderr[-2000:]


def test_an_unknown_term_on_the_command_line_exits_2_naming_the_option_before_any_rank(tmp_path):
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", "+loss.terms.nope={}", *TINY_JOB, timeout=300)
    assert proc.returncode == 2 and "loss.terms: unknown term(s) ['nope']" in proc.stderr, proc.stderr[-2000:]
    assert "starting" not in proc.stdout and "Traceback" not in proc.stderr, "refused by the launcher's preflight"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
