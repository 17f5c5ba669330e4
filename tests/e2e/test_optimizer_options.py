"""Every optimizer option does something or is refused: each `optimizer=` option has its own schema
(fft_dist.config.optimizer), so a key it lacks is an error naming the key, never silently ignored."""
from __future__ import annotations

import pytest

from helpers import fft_dist


@pytest.mark.parametrize("overrides,key", [
    (["optimizer=adamw", "optimizer.momentum=0.9"], "optimizer.momentum"),
    (["optimizer=sgd", "optimizer.betas=[0.9,0.95]"], "optimizer.betas"),
])
def test_an_option_the_chosen_optimizer_lacks_is_refused_by_the_cli(overrides, key, tmp_path):
    proc = fft_dist("train", "--cfg", "job", f"run.dir={tmp_path / 'r'}", *overrides, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "config error" in proc.stderr and key in proc.stderr


def test_the_valid_options_are_accepted_by_the_cli(tmp_path):
    proc = fft_dist("train", "--cfg", "job", f"run.dir={tmp_path / 'r'}", "optimizer=sgd", "optimizer.momentum=0.5",
                    "optimizer.nesterov=true", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "momentum: 0.5" in proc.stdout and "nesterov: true" in proc.stdout and "betas" not in proc.stdout


def test_a_users_own_optimizer_file_is_checked_against_its_schema(tmp_path):
    folder = tmp_path / "conf" / "optimizer"
    folder.mkdir(parents=True)
    (folder / "my_sgd.yaml").write_text("defaults: [/optimizer_schema/sgd@_here_, _self_]\n"  # as conf/optimizer/sgd.yaml
                                        "name: sgd\nmomentum: 0.5\nbetas: [0.9, 0.9]\n")
    proc = fft_dist("train", "--config-dir", str(tmp_path / "conf"), "optimizer=my_sgd", "--cfg", "job", timeout=120)
    assert proc.returncode == 2 and "optimizer.betas is not an option of optimizer=sgd" in proc.stderr, proc.stderr
