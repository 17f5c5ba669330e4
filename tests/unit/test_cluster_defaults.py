"""The first run on a GPU cluster (issue #17, cluster traps): CPUs asked for on SLURM and repeated on
srun, OMP_NUM_THREADS from the CPUs a rank may run on, a container with a CUDA image (or on a GPU host)
refused without launcher.gpus and one rank per GPU given, gloo following NCCL_SOCKET_IFNAME, NCCL's
async error handling, and dist.timeout_s=auto. Fast: dry runs, pure functions and in-process checks
(no GPU here: the host's GPUs and torch's CUDA are faked where a decision depends on them)."""
from __future__ import annotations

import pytest
import torch

from fft_dist import dist as fdist
from fft_dist.config import ConfigError
from launch_checks import dry


def test_slurm_cpus_per_task_must_be_auto_or_a_number():
    proc = dry("launcher=slurm", "launcher.cpus_per_task=many")
    assert proc.returncode == 2 and "launcher.cpus_per_task='many'" in proc.stderr, proc.stderr
    proc = dry("launcher=torchrun", "launcher.cpus_per_task=4")  # not a torchrun option
    assert proc.returncode == 2 and "launcher.cpus_per_task is not an option of launcher=torchrun" in proc.stderr, proc.stderr


def test_rank_threads_follow_the_cpu_affinity_not_the_machine(monkeypatch):
    """A SLURM task (or container) may run on 4 of a node's 64 CPUs: 2 ranks get 2 threads each, not 32."""
    import torch.distributed.run as trun

    from fft_dist.launchers import agent

    seen = {}
    monkeypatch.setattr(trun, "run", lambda args: seen.setdefault("omp", __import__("os").environ["OMP_NUM_THREADS"]))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert agent.start_agent(["--nproc_per_node=2", "--standalone"], None) == 0
    assert seen["omp"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's own setting wins
    seen.clear()
    agent.start_agent(["--nproc_per_node=2", "--standalone"], None)
    assert seen["omp"] == "7"


def test_a_cuda_torch_that_sees_no_gpu_says_it_trains_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "sees no GPU: training on CPU over gloo" in fdist.warn_cuda_unused("auto")
    assert fdist.warn_cuda_unused("gloo") is None  # asked for on purpose
    monkeypatch.setattr(torch.version, "cuda", None)
    assert fdist.warn_cuda_unused("auto") is None


# -- networking and time-outs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("nccl,gloo", [
    ("eth0", "eth0"), ("eth", "eth0,eth1"), ("=eth", None), ("=eth1", "eth1"), ("ib0,eth1", "ib0,eth1"),
    ("^docker,lo", None), ("wlan", None),
])
def test_gloo_interface_from_nccl_socket_ifname(nccl, gloo):
    assert fdist.gloo_ifname_from_nccl(nccl, ["lo", "eth0", "eth1", "ib0", "docker0"]) == gloo


@pytest.fixture
def fake_group(monkeypatch):
    """init_distributed up to init_process_group, which records its timeout and the environment instead."""
    seen: dict = {}

    def init_process_group(backend, timeout, **kwargs):
        seen.update(backend=backend, timeout=timeout.total_seconds(), env=dict(__import__("os").environ))

    monkeypatch.setattr(fdist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(fdist.dist, "init_process_group", init_process_group)
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    return seen


def test_gpu_runs_get_a_longer_timeout_nccl_error_handling_and_gloo_on_the_nccl_interface(fake_group, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    ctx = fdist.init_distributed("nccl", "auto")  # no GPU here: the group is faked, the decisions are real
    assert fake_group["timeout"] == 1800 and ctx.timeout_s == 1800
    assert fake_group["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert fake_group["env"]["GLOO_SOCKET_IFNAME"] == "lo"
    assert "collective timeout 1800 s (dist.timeout_s auto: the GPU default)" in fdist.describe_timeout("auto", ctx)


def test_cpu_runs_keep_600_s_and_explicit_settings_win(fake_group, monkeypatch):
    ctx = fdist.init_distributed("gloo", "auto")
    assert fake_group["timeout"] == 600 and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in fake_group["env"]
    assert "GLOO_SOCKET_IFNAME" not in fake_group["env"]
    assert "collective timeout 600 s (dist.timeout_s auto: the CPU default)" in fdist.describe_timeout("auto", ctx)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    fdist.init_distributed("nccl", "42")
    assert fake_group["timeout"] == 42
    assert (fake_group["env"]["GLOO_SOCKET_IFNAME"], fake_group["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"]) == ("eth9", "3")


@pytest.mark.parametrize("value,ok", [("auto", True), ("3", True), ("0", False), ("-5", False), ("1.5", False),
                                      ("soon", False)])
def test_dist_timeout_is_auto_or_whole_seconds(value, ok):
    from fft_dist.compose import compose, resolve, to_typed
    from fft_dist.validate import validate

    cfg = to_typed(resolve(compose([f"dist.timeout_s={value}"])))
    if ok:
        validate(cfg, 2)
    else:
        with pytest.raises(ConfigError, match="dist.timeout_s must be >= 1 second, or auto"):
            validate(cfg, 2)
