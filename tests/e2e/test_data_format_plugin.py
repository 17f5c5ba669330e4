"""The data format as an extension point: the built-ins and a toy format from tests/support/plugins go through the
one registry (fft_dist.data.formats.register_format), and the toy one trains on two real ranks."""
from __future__ import annotations

import os
import sys

from helpers import TINY_JOB, child_env, fft_dist, train_losses, SUPPORT
from data_format_plugin_shared import PLUGINS, ROWS, write


TOY_CONF = SUPPORT / "toy_conf"


sys.path.insert(0, str(PLUGINS))


def plugin_env() -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), env["PYTHONPATH"]])
    return env


def test_a_format_from_a_plugin_module_trains_on_two_ranks(tmp_path):
    """tests/support/plugins/toy_format.py registers toy_qa; its yaml comes through --config-dir; loss.plugins
    imports it in the launcher's checks and on each rank before the data is built; two fsdp ranks train."""
    run, data = tmp_path / "run", write(tmp_path / "qa.jsonl", ROWS)
    proc = fft_dist("train", "--config-dir", str(TOY_CONF), "data=toy", f"data.path={data}", f"run.dir={run}",
                    "parallelism=fsdp", "launcher.nproc_per_node=2", *TINY_JOB, "train.max_steps=3",
                    "loss.plugins=[toy_format]", env=plugin_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = train_losses(run)
    assert len(losses) == 3 and all(0 < x < 20 for x in losses), losses
    assert "format: toy_qa" in (run / "config.yaml").read_text()


def test_a_format_nobody_registered_is_refused_before_launch(tmp_path):
    """Without the plugin module, data.format=toy_qa is no format: exit 2 naming the registered ones."""
    proc = fft_dist("train", "--config-dir", str(TOY_CONF), "data=toy", f"data.path={write(tmp_path / 'qa.jsonl', ROWS)}",
                    f"run.dir={tmp_path / 'run'}", *TINY_JOB, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.format='toy_qa' is not a data format; registered: chat, classification" in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()
