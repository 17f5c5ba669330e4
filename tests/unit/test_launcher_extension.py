"""A new launcher is one module plus one yaml: tests/support/toy_launcher.py registers a launcher through the
package's own registration point, and `fft-dist launch launcher=toy` describes it (dry run), refuses
the options it does not own, and runs it once (a real rank trains two steps)."""
from __future__ import annotations

import toy_launcher

from helpers import TINY_JOB
from launch_checks import cli, TOY
from fft_dist.launchers import REGISTRY


def test_the_toy_launcher_is_registered_like_the_built_in_ones():
    assert REGISTRY["toy"] is toy_launcher.ToyLauncher
    assert {"local", "torchrun", "deepspeed", "slurm", "container"} <= set(REGISTRY)


def test_a_dry_run_prints_what_the_toy_launcher_would_run(tmp_path):
    code, out, err = cli("launch", *TOY, *TINY_JOB, f"run.dir={tmp_path}", "launcher.dry_run=true")
    assert code == 0, err
    assert out.startswith("# toy launcher") and out.rstrip().endswith("-m fft_dist.train"), out
    assert not (tmp_path / "config.yaml").exists(), "a dry run writes nothing"


def test_fft_dist_plugins_takes_module_names_by_the_rule_loss_plugins_follows(tmp_path, monkeypatch):
    """One import rule for both sources (fft_dist.plugins): a path or code is refused, never imported."""
    for value in ("/tmp/evil.py", "os; rm -rf /"):
        monkeypatch.setenv("FFT_DIST_PLUGINS", value)
        code, _, err = cli("train", f"run.dir={tmp_path}", "--cfg", "job")
        assert code == 2 and f"FFT_DIST_PLUGINS: {value!r} is not an importable module name" in err, err


def test_an_option_the_toy_launcher_does_not_own_is_refused(tmp_path):
    code, _, err = cli("launch", *TOY, f"run.dir={tmp_path}", "launcher.nnodes=2", "launcher.dry_run=true")
    assert code == 2 and "launcher.nnodes is not an option of launcher=toy" in err, err
