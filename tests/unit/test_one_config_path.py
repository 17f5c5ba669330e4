"""One compose -> type -> validate path: `--cfg job` (which prints exactly what config.yaml would hold),
`fft-dist launch` and `fft-dist data` agree on a config, with one world-size rule (nodes x ranks per node)."""
from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from launch_checks import cli


TWO_NODES = ["launcher=torchrun", "launcher.nnodes=2", "launcher.nproc_per_node=2", "launcher.rdzv_endpoint=n0:29400",
             "train.global_batch_size=4", "train.micro_batch_size=2"]


def test_cfg_job_and_launch_agree_on_a_two_node_batch_that_does_not_divide(tmp_path):
    """4 ranks x micro batch 2 cannot make a global batch of 4: both refuse, with the same message."""
    job = cli("train", *TWO_NODES, f"run.dir={tmp_path}", "--cfg", "job")
    launch = cli("launch", *TWO_NODES, f"run.dir={tmp_path}", "launcher.dry_run=true")
    assert launch[0] == 2, launch
    assert job[0] == launch[0], (job, launch)
    assert job[2] == launch[2] and "global_batch_size" in job[2], (job[2], launch[2])


def test_cfg_job_and_launch_both_accept_what_fits_the_whole_job(tmp_path):
    fits = [*TWO_NODES[:-2], "train.global_batch_size=8", "train.micro_batch_size=2", f"run.dir={tmp_path}"]
    job = cli("train", *fits, "--cfg", "job")
    assert job[0] == 0 and "nnodes: 2" in job[1], job
    launch = cli("launch", *fits, "launcher.dry_run=true")
    assert launch[0] == 0, launch


def test_cfg_job_refuses_an_option_the_launcher_does_not_use_as_launch_does(tmp_path):
    wrong = ["launcher=local", "launcher.nnodes=2", f"run.dir={tmp_path}"]
    job = cli("train", *wrong, "--cfg", "job")
    launch = cli("launch", *wrong, "launcher.dry_run=true")
    assert job[0] == launch[0] == 2 and job[2] == launch[2] and "launcher.nnodes is not an option of launcher=local" in job[2], (job, launch)


def test_each_launcher_types_its_own_options_and_the_ranks_read_them_back(tmp_path):
    """launcher=<name> selects that launcher's dataclass: config.yaml holds its options only, and a rank
    types the file back to the same object."""
    from fft_dist.compose import load_text, prepare
    from fft_dist.launchers import REGISTRY

    extra = {"slurm": ["launcher.gpus_per_node=0", "launcher.nproc_per_node=2"],
             "container": ["launcher.image=fft-dist:cpu", "launcher.gpus=none"], "deepspeed": ["parallelism=zero2"]}
    for name in ("local", "torchrun", "deepspeed", "slurm", "container"):
        prepared = prepare([f"launcher={name}", f"run.dir={tmp_path}", *extra.get(name, [])])
        assert type(prepared.cfg.launcher) is REGISTRY[name].schema, name
        assert load_text(prepared.yaml).launcher == prepared.cfg.launcher, name
        written = set(OmegaConf.create(prepared.yaml).launcher)
        assert written == {f.name for f in dataclasses.fields(REGISTRY[name].schema)}, (name, written)


def test_an_option_of_another_launcher_is_refused_even_at_its_default(tmp_path):
    """The schema has no such key (before, only a changed value was refused)."""
    code, _, err = cli("train", "launcher.nnodes=1", f"run.dir={tmp_path}", "--cfg", "job")
    assert code == 2 and "launcher.nnodes is not an option of launcher=local (an option of launcher=torchrun" in err


def test_cfg_job_and_launch_agree_on_names_only_plugins_could_register(tmp_path):
    """A data format or loss term nobody registered: composing cannot know it (a plugin may add it),
    so `--cfg job` runs the launcher's registry checks too, and both refuse with the same message."""
    for override, message in (("data.format=nope", "data.format='nope' is not a data format"),
                              ("+loss.terms.nope={}", "loss.terms: unknown term(s) ['nope']")):
        job = cli("train", override, f"run.dir={tmp_path}", "--cfg", "job")
        launch = cli("launch", override, f"run.dir={tmp_path}", "launcher.dry_run=true")
        assert job[0] == launch[0] == 2, (override, job, launch)
        assert message in job[2] and message in launch[2], (override, job[2], launch[2])
