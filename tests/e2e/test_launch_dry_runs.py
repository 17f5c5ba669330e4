"""What each launcher would run, printed by `launcher.dry_run=true` (nothing trains): torchrun and local,
deepspeed with and without a hostfile, the container command, and one local rank that runs in the
launcher's own process unless a launcher.env value needs torchrun's agent; every generated script passes
`bash -n`, values with spaces, quotes and `$` stay single words; `fft-dist train` takes only the local
launcher; the shipped scripts/ parse. SLURM's dry runs are in test_launch_slurm.py."""
from __future__ import annotations

import pytest

from helpers import fft_dist, REPO, TINY_JOB
from launch_checks import ODD, SINGLE, bash_syntax_ok, dry, dry_ok, flag, last_line_words


def test_launcher_env_keeps_a_separate_rank_process_and_the_dry_run_says_which(tmp_path):
    inproc = fft_dist("train", f"run.dir={tmp_path / 'a'}", *TINY_JOB, *SINGLE, "launcher.dry_run=true")
    assert inproc.returncode == 0 and "in its own process" in inproc.stdout
    assert inproc.stdout.strip().splitlines()[-1].endswith("-m fft_dist.train")
    agent = fft_dist("train", f"run.dir={tmp_path / 'b'}", *TINY_JOB, *SINGLE, "launcher.dry_run=true",
                     "+launcher.env.MALLOC_ARENA_MAX=2")
    assert agent.returncode == 0 and "torch.distributed.run" in agent.stdout


def test_local_and_torchrun_dry_runs_show_the_torchrun_command_and_run_nothing(tmp_path):
    run = tmp_path / "r"
    words = last_line_words(dry_ok(f"run.dir={run}", "launcher.nproc_per_node=3", "train.global_batch_size=12",
                                   "train.micro_batch_size=4"))
    assert words[0] == f"FFT_DIST_CONFIG={run}/config.yaml" and "--standalone" in words
    assert flag(words, "--nproc_per_node") == "3" and flag(words, "--max_restarts") == "0"
    assert not run.exists(), "a dry run must not create the run directory"
    nodes = ["launcher=torchrun", "launcher.nnodes=2", "launcher.rdzv_endpoint=10.77.0.1:29400",
             "launcher.rdzv_id=job7", "launcher.max_restarts=3", f'run.dir="{ODD}"', "+launcher.env.ODD='a \"b\" $c'"]
    for rank in (0, 1):
        words = last_line_words(dry_ok(*nodes, f"launcher.node_rank={rank}", f"launcher.local_addr=10.77.0.{rank + 1}"))
        assert words[:2] == [f"FFT_DIST_CONFIG={ODD}/config.yaml", 'ODD=a "b" $c'], words[:2]
        assert (flag(words, "--nnodes"), flag(words, "--node_rank"), flag(words, "--rdzv_backend")) == ("2", str(rank), "c10d")
        assert (flag(words, "--rdzv_endpoint"), flag(words, "--rdzv_id")) == ("10.77.0.1:29400", "job7")
        assert flag(words, "--local_addr") == f"10.77.0.{rank + 1}" and flag(words, "--max_restarts") == "3"
        assert flag(words, "--rdzv_conf") == f"is_host={'true' if rank == 0 else 'false'}"
    # the whole job's world size (2 nodes x 2 ranks) is what the batch must divide by
    proc = dry("launcher=torchrun", "launcher.nnodes=2", "launcher.rdzv_endpoint=h:1", "train.global_batch_size=4",
               "train.micro_batch_size=2")
    assert proc.returncode == 2 and "world size (4)" in proc.stderr, proc.stderr


@pytest.mark.parametrize("parallelism", ["zero2", "zero3"])
def test_deepspeed_dry_runs_local_and_hostfile(tmp_path, parallelism):
    words = last_line_words(dry_ok("launcher=deepspeed", f"parallelism={parallelism}", f"run.dir={tmp_path}/r"))
    assert words[0] == f"FFT_DIST_CONFIG={tmp_path}/r/config.yaml"
    assert words[2:4] == ["-m", "deepspeed.launcher.runner"] and flag(words, "--num_gpus") == "2"
    assert words[-2:] == ["--module", "fft_dist.train"]
    out = dry_ok("launcher=deepspeed", f"parallelism={parallelism}", f"run.dir={tmp_path}/r", "launcher.hosts=[n1,n2]",
                 "launcher.nproc_per_node=4", "train.global_batch_size=32", "launcher.include='n1:0,1@n2'",
                 "launcher.exclude=n2:3", "+launcher.env.NCCL_SOCKET_IFNAME=eth0")
    assert f"# {tmp_path}/r/hostfile: n1 slots=4" in out and f"# {tmp_path}/r/hostfile: n2 slots=4" in out
    assert "NCCL_SOCKET_IFNAME=eth0" in out and f"FFT_DIST_CONFIG={tmp_path}/r/config.yaml" in out
    words = last_line_words(out)
    assert words[0] == f"DS_ENV_FILE={tmp_path}/r/deepspeed_env" and "--num_gpus" not in words
    assert (flag(words, "--hostfile"), flag(words, "--include"), flag(words, "--exclude")) == (
        f"{tmp_path}/r/hostfile", "n1:0,1@n2", "n2:3")


def test_container_dry_run(tmp_path):
    words = last_line_words(dry_ok("launcher=container", "launcher.image=localhost/fft-dist:cpu", "launcher.engine=podman",
                                   "launcher.mounts=[/data:/data:ro]", "launcher.gpus=all", f'run.dir="{ODD}"',
                                   "+launcher.env.HF_HOME=/data/hf"))
    assert words[:3] == ["podman", "run", "--rm"] and f"--volume={ODD}:{ODD}" in words
    assert "--volume=/data:/data:ro" in words and "--env=HF_HOME=/data/hf" in words
    assert flag(words, "--gpus") == "all" and flag(words, "--ipc") == "host"
    assert f"--env=FFT_DIST_CONFIG={ODD}/config.yaml" in words
    image = words.index("localhost/fft-dist:cpu")
    assert words[image + 1] == "node" and flag(words, "--nproc_per_node") == "2"
    words = last_line_words(dry_ok("launcher=container", "launcher.image=i", "launcher.ipc_host=false",
                                   "launcher.shm_size=8g", f"run.dir={tmp_path}/r"))
    assert flag(words, "--shm-size") == "8g" and not [w for w in words if w.startswith("--ipc")]


def test_train_is_launcher_local_only(tmp_path):
    proc = fft_dist("train", "launcher=torchrun", f"run.dir={tmp_path}/r", timeout=120)
    assert proc.returncode == 2 and "fft-dist launch" in proc.stderr, proc.stderr


def test_shipped_launch_scripts_parse():
    for path in sorted((REPO / "scripts").glob("*.s*")):
        bash_syntax_ok(path.read_text())
