"""The first run on a GPU cluster (issue #17, cluster traps): CPUs asked for on SLURM and repeated on
srun, OMP_NUM_THREADS from the CPUs a rank may run on, a container with a CUDA image (or on a GPU host)
refused without launcher.gpus and one rank per GPU given, gloo following NCCL_SOCKET_IFNAME, NCCL's
async error handling, and dist.timeout_s=auto. Fast: dry runs, and generated scripts run by bash with
srun stubbed (no GPU here: the host's GPUs and torch's CUDA are faked where a decision depends on them)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fft_dist.config import launcher as config_launcher
from launch_checks import dry, dry_ok, flag, last_line_words, slurm_script


GPU_JOB = ["launcher.nodes=2", "launcher.gpus_per_node=8", "train.global_batch_size=64"]


def srun_line(text: str) -> str:
    return text[text.index("srun "):text.index("code=$?")]


def run_with_stubbed_srun(text: str, where: Path, cpus_on_node: str) -> list[str]:
    """Run the script as the batch node would (SLURM's commands stubbed); srun's arguments as bash passed them."""
    script = where / "job.sbatch"
    script.write_text(text)
    stubs = ("srun() { printf '%s\\0' \"$@\" > \"$OUT\"; }\nscontrol() { echo node1; }\n"
             "export -f srun scontrol\nexec bash \"$0\"\n")
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "OUT": str(where / "argv"),
           "HOME": str(where), "SLURM_CPUS_ON_NODE": cpus_on_node}
    proc = subprocess.run(["bash", "-c", stubs, str(script)], cwd=where, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return (where / "argv").read_text().split("\0")[:-1]


# -- SLURM: CPUs --------------------------------------------------------------------------------------------
def test_slurm_asks_for_whole_gpu_nodes_by_default_and_srun_takes_every_cpu(tmp_path):
    text = slurm_script(*GPU_JOB, f"run.dir={tmp_path}/r")
    assert "#SBATCH --exclusive\n" in text, text
    assert '--cpus-per-task="$SLURM_CPUS_ON_NODE"' in srun_line(text)
    argv = run_with_stubbed_srun(text, tmp_path, cpus_on_node="96")
    assert "--cpus-per-task=96" in argv and argv[0] == "--ntasks-per-node=1", argv
    ds = slurm_script(*GPU_JOB, "parallelism=zero3", "launcher.use_deepspeed_launcher=true", f"run.dir={tmp_path}/r")
    assert "#SBATCH --exclusive\n" in ds and '--cpus-per-task="$SLURM_CPUS_ON_NODE"' in srun_line(ds)


@pytest.mark.parametrize("overrides,sbatch,srun", [
    (["launcher.cpus_per_task=32"], "#SBATCH --cpus-per-task=32", "--cpus-per-task=32"),
    (["launcher.gpus_per_node=0", "launcher.nproc_per_node=4"], "#SBATCH --cpus-per-task=4", "--cpus-per-task=4"),
    (["launcher.cpus_per_task=0"], None, None),
])
def test_slurm_cpu_request_is_repeated_on_srun(tmp_path, overrides, sbatch, srun):
    text = slurm_script(*GPU_JOB, f"run.dir={tmp_path}/r", *overrides)
    assert "#SBATCH --exclusive" not in text
    if sbatch is None:
        assert "--cpus-per-task" not in text, text
    else:
        assert sbatch + "\n" in text and srun in srun_line(text), text
        assert run_with_stubbed_srun(text, tmp_path, cpus_on_node="96")[1] == srun


# -- containers and GPUs --------------------------------------------------------------------------------------
@pytest.fixture
def host_gpus(monkeypatch):
    """set(n): pretend this host has n NVIDIA GPUs (/dev/nvidia0..n-1)."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(config_launcher, "host_gpus", lambda: n, raising=False)  # raising: the test predates it

    set_count(0)
    return set_count


def container(*overrides: str) -> list[str]:
    return last_line_words(dry_ok("launcher=container", *overrides))


@pytest.mark.parametrize("image,gpus_here,why", [
    ("fft-dist:cuda", 0, "is a CUDA image"),
    ("pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime", 0, "is a CUDA image"),
    ("localhost/fft-dist:cpu", 4, "this host has 4 NVIDIA GPU(s)"),
])
def test_a_gpu_container_without_launcher_gpus_is_refused(host_gpus, image, gpus_here, why):
    host_gpus(gpus_here)
    proc = dry("launcher=container", f"launcher.image={image}")
    assert proc.returncode == 2, proc.stdout
    assert why in proc.stderr and "launcher.gpus is empty" in proc.stderr and "train on CPU" in proc.stderr
    words = container(f"launcher.image={image}", "launcher.gpus=none")  # CPU on purpose
    assert not [w for w in words if w.startswith("--gpus")] and flag(words, "--nproc_per_node") == "2"


def test_the_rank_count_follows_the_gpus_given(host_gpus):
    host_gpus(4)
    words = container("launcher.image=fft-dist:cuda", "launcher.gpus=all", "train.global_batch_size=16")
    assert flag(words, "--gpus") == "all" and flag(words, "--nproc_per_node") == "4"
    words = container("launcher.image=fft-dist:cuda", "launcher.gpus=2")
    assert flag(words, "--gpus") == "2" and flag(words, "--nproc_per_node") == "2"
    words = container("launcher.image=fft-dist:cuda", "launcher.gpus=\"device=0,1,2\"", "train.global_batch_size=12",
                      "train.micro_batch_size=4")
    assert flag(words, "--gpus") == '"device=0,1,2"' and flag(words, "--nproc_per_node") == "3"
    proc = dry("launcher=container", "launcher.image=fft-dist:cuda", "launcher.gpus=2", "launcher.nproc_per_node=4")
    assert proc.returncode == 2 and "gives the container 2 GPU(s)" in proc.stderr, proc.stderr
