"""One mechanism for a group whose chosen option has its own schema (fft_dist/config/variants.py): launcher and
optimizer go through it alike, and a launcher of your own with options of its own joins it through
`register` alone: typed by its yaml, listed by `--help` under its option, refused by name elsewhere. In-process."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from fft_dist.compose import typed
from fft_dist.config import LAUNCHERS, OPTIMIZERS, ConfigError, FFTConfig, LauncherConfig, variant_fields
from fft_dist.config_help import help_text
from fft_dist.launchers import REGISTRY, Launcher, register


@dataclass
class QueueOptions(LauncherConfig):
    """launcher=queued: a launcher of one's own, with one option of its own."""

    queue: str = "fast"
    """Which queue the job waits in."""


@pytest.fixture
def queued(tmp_path):
    """launcher=queued, registered as any launcher is, and its yaml as any option's names its schema."""

    @register
    class Queued(Launcher):
        name = "queued"
        schema = QueueOptions

    (tmp_path / "launcher").mkdir()
    (tmp_path / "launcher" / "queued.yaml").write_text(
        "defaults:\n  - /launcher_schema/queued@_here_\n  - _self_\n\nname: queued\nqueue: slow\n")
    try:
        yield str(tmp_path)
    finally:
        REGISTRY.pop("queued")
        LAUNCHERS.schemas.pop("queued")


def test_launcher_and_optimizer_are_the_same_kind_of_group():
    assert dict(variant_fields(FFTConfig)) == {"launcher": LAUNCHERS, "optimizer": OPTIMIZERS}
    text = help_text()
    for key, tag in (("launcher.nodes", "[launcher=slurm]"), ("optimizer.momentum", "[optimizer=sgd]"),
                     ("optimizer.betas", "[optimizer=adamw|adam]")):
        line = text[text.index(f"  {key} :"):]
        assert line.splitlines()[1].strip().startswith(tag), line[:200]


def test_a_launcher_of_your_own_joins_through_register_alone(queued):
    cfg, yaml = typed(["launcher=queued", "launcher.queue=night"], config_dirs=[queued])
    assert type(cfg.launcher) is QueueOptions and cfg.launcher.queue == "night" and "queue: night" in yaml
    assert "[launcher=queued] Which queue the job waits in." in help_text()
    with pytest.raises(ConfigError, match=r"launcher\.nnodes is not an option of launcher=queued \(an option of "
                                          r"launcher=torchrun; launcher=queued has .*queue\)"):
        typed(["launcher=queued", "launcher.nnodes=2"], config_dirs=[queued])
    with pytest.raises(ConfigError, match=r"launcher\.queue is not an option of launcher=torchrun \(an option of "
                                          r"launcher=queued"):
        typed(["launcher=torchrun", "launcher.queue=night"], config_dirs=[queued])
