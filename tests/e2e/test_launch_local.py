"""Real local runs: one rank in the launcher's own process (none and zero3; launcher variables left in
the environment, as inside a SLURM allocation, do not reach it), two ranks under torchrun and under the
deepspeed launcher, and two nodes in two network namespaces whose losses equal a single node's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import child_env, fft_dist, read_metrics, REPO, TINY_JOB, step_records
from launch_checks import SINGLE, kill_job, launch


def test_stray_launcher_variables_in_the_environment_do_not_reach_the_in_process_rank(tmp_path):
    """Inside e.g. a SLURM allocation MASTER_ADDR / WORLD_SIZE may be exported; torchrun used to overwrite them."""
    env = child_env(MASTER_ADDR="10.255.255.1", MASTER_PORT="1", WORLD_SIZE="8", LOCAL_RANK="3")
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", *TINY_JOB, *SINGLE, "train.max_steps=2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 1 ranks" in proc.stdout and [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]


def test_one_rank_zero3_runs_in_the_launchers_process(tmp_path):
    """DeepSpeed reads LOCAL_RANK to pick its device; torchrun would set it for its only rank, so the
    in-process rank does too (a KeyError: 'LOCAL_RANK' before)."""
    proc = fft_dist("train", f"run.dir={tmp_path / 'run'}", *TINY_JOB, "parallelism=zero3", "launcher.nproc_per_node=1",
                    "train.global_batch_size=2", "train.max_steps=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_ranks_finish_under_the_real_launcher(tmp_path, launcher):
    extra = ["parallelism=zero2"] if launcher == "deepspeed" else []
    launch(tmp_path / "r", f"launcher={launcher}", *extra, "train.max_steps=4")
    steps = step_records(tmp_path / "r")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] for r in steps)  # finite numbers, logged by the ranks


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2): two "nodes" on one box."""
    tag = f"{os.getpid() % 100000}"
    ns, veth = [f"fft{tag}n{i}" for i in (0, 1)], [f"fft{tag}v{i}" for i in (0, 1)]
    steps = [["ip", "netns", "add", ns[0]], ["ip", "netns", "add", ns[1]],
             ["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]]]
    for i in (0, 1):
        steps += [["ip", "link", "set", veth[i], "netns", ns[i]],
                  ["ip", "-n", ns[i], "addr", "add", f"10.77.0.{i + 1}/24", "dev", veth[i]],
                  ["ip", "-n", ns[i], "link", "set", veth[i], "up"], ["ip", "-n", ns[i], "link", "set", "lo", "up"]]
    try:
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode:
                print(f"SKIP reason: {' '.join(step)} failed: {proc.stderr.strip()}")
                pytest.skip(f"cannot make network namespaces here: {' '.join(step)}: {proc.stderr.strip()}")
        yield ns, veth
    finally:
        for name in ns:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.slow
def test_two_nodes_in_network_namespaces_match_a_single_node_run(tmp_path, two_namespaces):
    ns, veth = two_namespaces
    job = [*TINY_JOB, "train.max_steps=4"]
    launch(tmp_path / "single", *job, "launcher=torchrun")
    run = tmp_path / "two-nodes"
    procs = []
    try:
        for rank in (0, 1):
            cmd = ["ip", "netns", "exec", ns[rank], "env", f"GLOO_SOCKET_IFNAME={veth[rank]}", sys.executable, "-m",
                   "fft_dist.cli", "launch", f"run.dir={run}", *job, "launcher=torchrun", "launcher.nnodes=2",
                   f"launcher.node_rank={rank}", "launcher.nproc_per_node=1", "launcher.rdzv_endpoint=10.77.0.1:29400",
                   f"launcher.local_addr=10.77.0.{rank + 1}", f"launcher.rdzv_id=t{os.getpid()}"]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            kill_job(p)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out[-3000:]}\n{err[-5000:]}"
    assert "(node 1 of 2)" in outs[1][0]
    single, two = [r["loss"] for r in step_records(tmp_path / "single")], [r["loss"] for r in step_records(run)]
    assert len(two) == 4 and two == single, (two, single)
